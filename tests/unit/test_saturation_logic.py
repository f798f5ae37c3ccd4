"""Saturation user-space logic on synthetic kernel output: iterator records folded per
namespace, the per-workload summary in the AgentSnapshot, and the Prometheus families
(names, labels, values) on a private registry. No privileges needed."""
from __future__ import annotations

import socket

from meshlens.agent.aggregate.saturation import WorkloadSaturation, summarize
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.identity.model import Workload
from meshlens.agent.sources.saturation.source import (
    Conntrack,
    EphemeralPorts,
    Listener,
    NetnsView,
    SatSnapshot,
    fold_records,
)
from meshlens.agent.sources.saturation.structs import REC_LISTEN, REC_SUMMARY, REC_ZEROWIN, ZW_LOCAL, ZW_PEER, SatIterRec
from meshlens.exporter.prometheus.collector import make_registry
from meshlens.exporter.prometheus.saturation import saturation_families


def v4(addr: str):
    return tuple(socket.inet_aton(addr)) + (0,) * 12


def listener(netns: int, port: int, queue: int, limit: int, drops: int, cgroup: int = 5) -> SatIterRec:
    return SatIterRec(kind=REC_LISTEN, netns=netns, port=port, a=queue, b=limit, drops=drops, cgroup_id=cgroup,
                      family=4, addr=v4("10.0.0.2"))


def test_fold_records_per_namespace() -> None:
    recs = [
        listener(11, 80, 2, 1, 20),
        listener(11, 80, 1, 1, 3),  # SO_REUSEPORT sibling: one series per address and port
        SatIterRec(kind=REC_ZEROWIN, netns=11, cgroup_id=5, family=4, addr=v4("10.0.0.9"), c=ZW_LOCAL | ZW_PEER),
        SatIterRec(kind=REC_ZEROWIN, netns=11, cgroup_id=5, family=4, addr=v4("10.0.0.9"), c=ZW_LOCAL),
        SatIterRec(kind=REC_SUMMARY, netns=11, a=6, probes=4),
    ]
    views = {11: NetnsView(b"".join(bytes(r) for r in recs), (40000, 40003), ((17,), (262144,))),
             12: NetnsView(b"", (32768, 60999), ((), ()))}
    listeners, zero, ports, ct = fold_records(views)
    assert listeners == {(11, "10.0.0.2", 80): Listener(5, 3, 2, 23)}
    assert zero == {(11, 5, "10.0.0.9", "local"): 2, (11, 5, "10.0.0.9", "peer"): 1}
    assert ports[11] == EphemeralPorts(4, 40000, 40003, 6) and ports[11].size == 4
    assert ports[12] == EphemeralPorts(0, 32768, 60999, 0)
    assert ct == {11: Conntrack(17, 262144)}  # no conntrack in namespace 12: no series


class Pods:
    """cgroup 5 or netns 11 -> shop/web; anything else -> unknown process."""

    def local(self, cgroup_id, netns, process):
        if cgroup_id == 5 or netns == 11:
            return Workload("shop", "web-1", "Deployment", "web")
        return Workload("", "", "process", "")

    def peer(self, address):
        return Workload("shop", "db-0", "StatefulSet", "db")

    def expired(self, workload):
        return False


def sample_snapshot() -> SatSnapshot:
    return SatSnapshot(
        drops={(11, 0, "ipv4", "netfilter_drop"): 1009, (11, 5, "ipv4", "socket_rcvbuff"): 208,
               (99, 0, "ipv6", "no_socket"): 4},
        sock_events={(11, 5, "10.0.0.9", "error", "ECONNREFUSED"): 7,
                     (11, 5, "10.0.0.9", "port_exhausted", ""): 5,
                     (11, 5, "10.0.0.9", "rcvbuf_drop", "socket_rcvbuff"): 208},
        listeners={(11, "10.0.0.2", 80): Listener(5, 2, 4, 20)},
        zero_window={(11, 5, "10.0.0.9", "local"): 1},
        ephemeral={11: EphemeralPorts(3, 40000, 40003)},
        conntrack={11: Conntrack(131072, 262144)},
    )


def test_summary_per_workload() -> None:
    out = summarize(sample_snapshot(), Pods())
    web = out[Workload("shop", "web-1", "Deployment", "web")]
    assert web == WorkloadSaturation(drops=1217, netfilter_drops=1009, listen_overflows=20, accept_queue_fill=0.5,
                                     zero_window_connections=1, buffer_events=208, socket_errors=7,
                                     port_exhaustion_failures=5, ephemeral_ports_fill=0.75, conntrack_fill=0.5)
    assert out[Workload("", "", "process", "")].drops == 4
    assert summarize(None, Pods()) == {}


def snapshot(sat: SatSnapshot) -> AgentSnapshot:
    return AgentSnapshot(areas={"sat": sat}, health={}, attach={}, process=ProcessStats(0, 0, 0), identity=Pods())


def test_families_names_labels_values() -> None:
    reg = make_registry(lambda: snapshot(sample_snapshot()), [saturation_families])
    local = {"netns": "11", "k8s_namespace_name": "shop", "k8s_pod_name": "web-1", "k8s_owner_kind": "Deployment",
             "k8s_owner_name": "web"}
    peer = {"network_peer_address": "10.0.0.9", "peer_k8s_namespace_name": "shop", "peer_k8s_pod_name": "db-0",
            "peer_k8s_owner_kind": "StatefulSet", "peer_k8s_owner_name": "db"}
    get = reg.get_sample_value
    assert get("meshlens_net_drops_total", {**local, "protocol": "ipv4", "reason": "netfilter_drop"}) == 1009
    lst = {**local, "listen_address": "10.0.0.2", "server_port": "80"}
    assert get("meshlens_tcp_listen_overflows_total", lst) == 20
    assert get("meshlens_tcp_accept_queue_length", lst) == 2
    assert get("meshlens_tcp_accept_queue_limit", lst) == 4
    assert get("meshlens_tcp_zero_window_connections", {**local, **peer, "side": "local"}) == 1
    assert get("meshlens_socket_errors_total", {**local, **peer, "error": "ECONNREFUSED"}) == 7
    assert get("meshlens_tcp_connect_port_exhausted_total", {**local, **peer}) == 5
    assert get("meshlens_socket_buffer_events_total",
               {**local, **peer, "event": "rcvbuf_drop", "reason": "socket_rcvbuff"}) == 208
    assert get("meshlens_net_ephemeral_ports_in_use", {"netns": "11"}) == 3
    assert get("meshlens_net_ephemeral_ports_limit", {"netns": "11"}) == 4
    assert get("meshlens_net_conntrack_entries", {"netns": "11"}) == 131072
    assert get("meshlens_net_conntrack_limit_entries", {"netns": "11"}) == 262144


def test_no_sat_area_no_families() -> None:
    snap = AgentSnapshot(areas={}, health={}, attach={}, process=ProcessStats(0, 0, 0))
    assert list(saturation_families(snap)) == []
