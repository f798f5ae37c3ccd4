"""tc series named by pod: the TcSource snapshot (interface -> peer netns inode) plus the
identity resolver fed by a fake API server (tests/integration/test_identity_pods.py's
cluster) give every pod-interface series its pod and workload, and the handshake RTT its
peer pod. The source runs in-process, as the agent runs it."""
from __future__ import annotations

import time

from prometheus_client.registry import CollectorRegistry

from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.sources.tc.source import TcSource
from meshlens.exporter.prometheus.collector import make_registry
from meshlens.exporter.prometheus.tc import tc_families
from tests.integration.test_identity_pods import cluster  # noqa: F401 - the fixture
from tests.integration.test_tcp_l4 import finish, run_json, start_listener


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for fam in reg.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_pod_interface_series_carry_pod_and_peer_names(cluster) -> None:  # noqa: F811
    pods, resolver, _ = cluster
    (frontend, front_w), (db, db_w) = pods[0], pods[1]
    src = TcSource()
    src.start()
    try:
        deadline = time.monotonic() + 5
        while not {frontend.host_veth, db.host_veth} <= {i.name for i in src.interfaces().values()}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server = start_listener(db, "server", "--host", "0.0.0.0", "--port", "8095", "--count", "3",
                                "--recv", "100", "--send", "100")
        run_json(frontend, "client", "--host", db.ipv4, "--port", "8095", "--count", "3", "--send", "100")
        finish(server)
        src.sweep(time.monotonic_ns())
        snap = AgentSnapshot(areas={"tc": src.snapshot()}, health={}, attach={}, process=ProcessStats(0, 0, 0),
                             identity=resolver)
        reg = make_registry(lambda: snap, [tc_families])
    finally:
        src.stop()
    front = {"interface": frontend.host_veth, "netns": str(frontend.netns_inode), **front_w.local_labels()}
    assert _value(reg, "meshlens_pod_interface_packets_total", **front, direction="ingress") > 0
    assert _value(reg, "meshlens_pod_interface_tcp_flags_total", **front, direction="ingress", flag="syn") == 3
    back = {"interface": db.host_veth, **db_w.local_labels()}
    assert _value(reg, "meshlens_pod_interface_tcp_flags_total", **back, direction="ingress", flag="synack") == 3
    rtt = {**front, "role": "client", "network_peer_address": db.ipv4, **db_w.peer_labels()}
    assert _value(reg, "meshlens_pod_interface_handshake_rtt_seconds_count", **rtt) == 3
    rtt_srv = {**back, "role": "server", "network_peer_address": frontend.ipv4, **front_w.peer_labels()}
    assert _value(reg, "meshlens_pod_interface_handshake_rtt_seconds_count", **rtt_srv) == 3
