"""The gRPC Observer on real agents and the real relay: three simulated nodes (grpc_cluster.py),
one `meshlens relay` in front of them, real HTTP traffic into each node's nginx.

Checked against nginx's access logs: a follow stream through the relay carries every
request of all three nodes exactly once, in time order; killing one agent keeps the stream
going and names the node unavailable within seconds, restarting it brings its flows back;
a client that stops reading is dropped behind with a lost_events count that accounts for
every flow it missed; the relay's /metrics; TLS/mTLS with a CA this test makes."""
from __future__ import annotations

import collections
import contextlib
import datetime
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlens.exporter.proto import observer_pb2 as pb
from tests.integration.agent_proc import MESHLENS, AgentProcess
from tests.integration.grpc_cluster import (NODES, Follower, RelayProcess, SimNode, nodes, status,
                                            wait_until)
from tests.integration.servers import Nginx
from tests.unit.fake_apiserver import FakeApiServer, kubeconfig

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# odd request counts per node, with errors: (path, n)
PLANS = {"node-a": [("/status/200", 7), ("/status/503", 2)],
         "node-b": [("/status/200", 11)],
         "node-c": [("/status/200", 5), ("/status/404", 3)]}


class Cluster:
    def __init__(self, sims: Dict[str, SimNode], relay: RelayProcess, kc: str) -> None:
        self.sims, self.relay, self.kc = sims, relay, kc


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    sims: Dict[str, SimNode] = {}
    tmp = tempfile.mkdtemp(prefix="meshlens-grpc-")
    try:
        for n in NODES:
            sims[n] = SimNode(n)
        objects = [o for s in sims.values() for o in s.objects()]
        with FakeApiServer(objects) as api:
            kc = os.path.join(tmp, "kubeconfig")
            kubeconfig(kc, api.url)
            for s in sims.values():
                s.nginx = Nginx(s.web)
                s.start_agent(kc)
            for s in sims.values():
                assert wait_until(s.synced, timeout=30), f"{s.name}: identity watch not synced"
            relay = RelayProcess("--agents", ",".join(s.grpc_addr for s in sims.values()), "--sort-window", "1.5")
            with relay:
                assert wait_until(lambda: status(relay.addr).num_connected_nodes == 3, timeout=20), relay.log()
                yield Cluster(sims, relay, kc)
    finally:
        for s in sims.values():
            s.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def access_counts(s: SimNode, since: int = 0) -> Dict[int, int]:
    assert s.nginx is not None
    entries = s.nginx.access_log_entries()[since:]
    return dict(collections.Counter(int(e["status"]) for e in entries))


def l7(flows: List[pb.Flow], direction: int, reply: bool) -> List[pb.Flow]:
    return [f for f in flows if f.type == pb.L7 and f.traffic_direction == direction and f.is_reply == reply]


def expected_requests(plan) -> int:
    return sum(n for _, n in plan)


def test_relay_stream_has_every_node_in_time_order_exactly_once(cluster: Cluster) -> None:
    f = Follower(cluster.relay.addr, pb.GetFlowsRequest(follow=True, whitelist=[pb.FlowFilter(namespace="shop")]))
    try:
        assert wait_until(lambda: all(status(s.grpc_addr).num_connected_nodes for s in cluster.sims.values()))
        time.sleep(0.5)
        before = {n: len(s.nginx.access_log_entries()) for n, s in cluster.sims.items()}  # type: ignore[union-attr]
        reports = {n: s.load(PLANS[n]) for n, s in cluster.sims.items()}
        want = {n: expected_requests(PLANS[n]) for n in NODES}
        for n, s in cluster.sims.items():
            assert s.nginx is not None and len(s.nginx.access_log_entries(expect=before[n] + want[n])) == before[n] + want[n]

        def complete() -> bool:
            return all(len(l7(f.flows(n), pb.INGRESS, True)) >= want[n] for n in NODES)
        assert wait_until(complete, timeout=20), {n: len(f.flows(n)) for n in NODES}
        time.sleep(2.0)             # one more sort window: nothing further may arrive (exactly once)
        for n, s in cluster.sims.items():
            truth = access_counts(s, before[n])
            assert {int(k): v for k, v in reports[n].items()} == truth
            flows = f.flows(n)
            server_side = l7(flows, pb.INGRESS, True)
            assert dict(collections.Counter(x.l7.http.code for x in server_side)) == truth, n
            assert len(l7(flows, pb.INGRESS, False)) == want[n]
            # the client pod's side of the same requests (its veth): as many, same statuses
            client_side = l7(flows, pb.EGRESS, True)
            assert dict(collections.Counter(x.l7.http.code for x in client_side)) == truth, n
            for x in server_side:
                assert (x.source.pod_name, x.destination.pod_name) == (s.web_pod, s.client_pod)
                assert x.source.ip == s.web.ipv4 and x.destination.ip == s.client.ipv4 and x.source.port == 80
                assert x.l7.http.latency_seconds > 0
            # L4: the client's one keep-alive connection, seen at both ends (follow mode), its
            # bytes equal to what nginx logged for that connection (request_length, bytes_sent)
            entries = s.nginx.access_log_entries()[before[n]:]  # type: ignore[union-attr]
            [port] = {e["remote_port"] for e in entries}
            up, down = sum(e["request_length"] for e in entries), sum(e["bytes_sent"] for e in entries)
            conn = [x for x in flows if x.type == pb.L4 and x.destination.port == 80 and x.source.port == port]
            events = collections.Counter((x.l4.event, x.traffic_direction) for x in conn)
            assert events == {("open", pb.EGRESS): 1, ("close", pb.EGRESS): 1, ("open", pb.INGRESS): 1,
                              ("close", pb.INGRESS): 1}, (n, events)
            [c_close] = [x for x in conn if x.l4.event == "close" and x.traffic_direction == pb.EGRESS]
            [s_close] = [x for x in conn if x.l4.event == "close" and x.traffic_direction == pb.INGRESS]
            assert (c_close.l4.bytes_sent, c_close.l4.bytes_received) == (up, down), n
            assert (s_close.l4.bytes_sent, s_close.l4.bytes_received) == (down, up), n
            assert c_close.source.pod_name == s.client_pod and c_close.destination.pod_name == s.web_pod
            assert c_close.l4.duration_seconds > 0 and s_close.l4.duration_seconds > 0
        every = f.flows()
        times = [x.time.ToNanoseconds() for x in every]
        assert times == sorted(times), "relay stream out of time order"
        keys = [(x.node_name, x.time.ToNanoseconds(), x.traffic_direction, x.is_reply) for x in every if x.type == pb.L7]
        assert len(keys) == len(set(keys)), "a flow arrived twice"
        assert {x.node_name for x in every} == set(NODES)
        # each agent streams only its own node's pods
        for x in every:
            sim = cluster.sims[x.node_name]
            assert {x.source.pod_name, x.destination.pod_name} <= {sim.web_pod, sim.client_pod, ""}
    finally:
        f.close()


def test_killed_agent_is_reported_and_comes_back(cluster: Cluster) -> None:
    b = cluster.sims["node-b"]
    f = Follower(cluster.relay.addr, pb.GetFlowsRequest(follow=True))
    try:
        time.sleep(0.5)
        assert b.agent is not None
        killed = time.monotonic()
        b.agent.stop(signal.SIGKILL)

        def unavailable():
            for t, r in list(f.got):
                if (r.WhichOneof("response_types") == "node_status"
                        and r.node_status.state_change == pb.NodeStatusEvent.NODE_UNAVAILABLE
                        and list(r.node_status.node_names) == ["node-b"]):
                    return t
            return None
        seen_at = wait_until(unavailable, timeout=10)
        assert seen_at, f.responses()
        assert seen_at - killed < 5.0, f"node-b reported unavailable after {seen_at - killed:.1f}s"
        st = status(cluster.relay.addr)
        assert st.num_connected_nodes == 2 and list(st.unavailable_nodes) == ["node-b"]
        # the stream goes on for the others
        a = cluster.sims["node-a"]
        n0 = len(l7(f.flows("node-a"), pb.INGRESS, True))
        a.load([("/status/200", 3)])
        assert wait_until(lambda: len(l7(f.flows("node-a"), pb.INGRESS, True)) == n0 + 3, timeout=15)
        # restart node-b's agent on the same port: connected again, its flows are back
        b.start_agent(cluster.kc)
        assert wait_until(b.synced, timeout=30)

        def connected():
            return any(r.WhichOneof("response_types") == "node_status"
                       and r.node_status.state_change == pb.NodeStatusEvent.NODE_CONNECTED
                       and list(r.node_status.node_names) == ["node-b"] for r in f.responses())
        assert wait_until(connected, timeout=20), cluster.relay.log()
        assert wait_until(lambda: status(cluster.relay.addr).num_connected_nodes == 3, timeout=10)
        before = len(b.nginx.access_log_entries())  # type: ignore[union-attr]
        b.load([("/status/200", 5)])
        assert wait_until(lambda: len(l7(f.flows("node-b"), pb.INGRESS, True)) == 5, timeout=15)
        assert access_counts(b, before) == {200: 5}
    finally:
        f.close()


def test_stalled_client_is_dropped_behind_with_lost_events(cluster: Cluster) -> None:
    """A client of node-a's agent that stops reading: the agent's memory stays bounded (its
    RSS is written to test-artifacts/grpc_stalled_client.txt for the closing note), and
    what the client missed is one lost_events count, exactly the flows it did not get."""
    a = cluster.sims["node-a"]
    assert a.agent is not None
    st0 = status(a.grpc_addr)
    stalled = Follower(a.grpc_addr, pb.GetFlowsRequest(follow=True), read=False)
    try:
        assert wait_until(lambda: status(a.grpc_addr).seen_flows >= st0.seen_flows, timeout=5)
        time.sleep(0.5)
        _, rss0 = a.agent.usage()
        seen0 = status(a.grpc_addr).seen_flows
        report = a.load([("/status/200", 1009)] * 3)
        assert report == {"200": 3027}
        time.sleep(2.0)             # the last sweep's tap records are in
        _, rss1 = a.agent.usage()
        seen1 = status(a.grpc_addr).seen_flows
        published = seen1 - seen0
        # request + response at both veths per sampled request (the tap halves its sampling
        # while records are lost); far more than the client's queue (--grpc-queue-size 4096)
        assert published > 2 * 4096
        stalled.start()                         # reads again: queued flows, then the gap
        # the queue's gap record itself (the kernel's loss records may come first, from the queue)
        assert wait_until(lambda: any(r.lost_events.source == pb.LostEvent.OBSERVER_EVENTS_QUEUE
                                      for r in stalled.responses("lost_events")), timeout=20)
        time.sleep(1.0)
        lost = [r.lost_events for r in stalled.responses("lost_events")
                if r.lost_events.source == pb.LostEvent.OBSERVER_EVENTS_QUEUE]
        kernel = [r.lost_events for r in stalled.responses("lost_events")
                  if r.lost_events.source == pb.LostEvent.PERF_EVENT_RING_BUFFER]
        got = len(stalled.flows())
        missed = sum(x.num_events_lost for x in lost)
        # every flow published while it stalled is either received or counted; the queue also
        # holds the kernel's own loss records, so those may be among the counted
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "grpc_stalled_client.txt").write_text(
            f"agent RSS before the stalled client's burst: {rss0 / 2**20:.1f} MiB\n"
            f"agent RSS after {published} flows for a client that did not read: {rss1 / 2**20:.1f} MiB\n"
            f"client got {got} flows, then lost_events {missed} (queue); kernel loss records: "
            f"{sum(x.num_events_lost for x in kernel)}\n")
        # what the client got: its queue (4096) and what HTTP/2 flow control let into the
        # transport's buffers before the stall; the rest is counted
        assert lost and missed > 0 and got < published
        assert published <= got + missed <= published + len(kernel) + 16, (got, missed, published)
        assert rss1 - rss0 < 64 * 2**20, f"agent grew by {(rss1 - rss0) / 2**20:.1f} MiB"
        # the agent's own /metrics carry the stream's counters: ServerStatus's, read between two
        # calls of it, and at least what this client was told it lost
        s_before = status(a.grpc_addr)
        text = a.agent.scrape_text()
        s_after = status(a.grpc_addr)
        assert s_before.seen_flows <= _metric(text, "meshlens_grpc_flows_published_total") <= s_after.seen_flows
        assert s_before.lost_events <= _metric(text, "meshlens_grpc_client_lost_events_total") <= s_after.lost_events
        assert _metric(text, "meshlens_grpc_client_lost_events_total") >= missed
        assert _metric(text, "meshlens_grpc_clients") >= 2          # the relay and this client
        assert _metric(text, "meshlens_grpc_following") == 1
        assert _metric(text, "meshlens_grpc_conversion_errors_total") == 0
    finally:
        stalled.close()


@contextlib.contextmanager
def running(agent: AgentProcess, timeout: float = 90.0) -> Iterator[AgentProcess]:
    """The agent started with a start-up timeout for a busy machine, always stopped."""
    agent.start(timeout)
    try:
        yield agent
    finally:
        agent.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_relay_metrics(cluster: Cluster) -> None:
    f = Follower(cluster.relay.addr, pb.GetFlowsRequest(follow=True))
    try:
        assert wait_until(lambda: _metric(cluster.relay.metrics_text(), "meshlens_relay_streams") >= 1)
        text = cluster.relay.metrics_text()
        assert _metric(text, "meshlens_relay_nodes", state="connected") == 3
        assert _metric(text, "meshlens_relay_nodes", state="unavailable") == 0
        relayed = _metric(text, "meshlens_relay_flows_relayed_total")
        assert relayed == status(cluster.relay.addr).seen_flows
        per_node = sum(_metric(text, "meshlens_relay_node_flows_total", node=n) for n in NODES)
        assert per_node >= relayed
        assert _metric(text, "meshlens_relay_node_connects_total", node="node-b") == 2   # killed once above
        assert _metric(text, "meshlens_relay_lost_events_total", source="OBSERVER_EVENTS_QUEUE", where="relay") == 0
    finally:
        f.close()


# ---- TLS -------------------------------------------------------------------------------------

def _ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca, name: str, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write(d: str, name: str, pair) -> Tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key, cert = pair
    kp, cp = os.path.join(d, f"{name}.key"), os.path.join(d, f"{name}.crt")
    Path(kp).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    Path(cp).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


def test_tls_relay_refuses_an_agent_not_signed_by_its_ca(cluster: Cluster) -> None:
    d = tempfile.mkdtemp(prefix="meshlens-tls-")
    try:
        ca, other = _ca("meshlens test CA"), _ca("someone else's CA")
        _, ca_crt = _write(d, "ca", ca)
        _, other_crt = _write(d, "other", other)
        srv_key, srv_crt = _write(d, "agent", _leaf(ca, "agent.node-t", server=True))
        cli_key, cli_crt = _write(d, "relay", _leaf(ca, "relay", server=False))
        rogue_key, rogue_crt = _write(d, "rogue", _leaf(other, "relay", server=False))
        from tests.integration.servers import free_port

        addr = f"127.0.0.1:{free_port()}"
        agent = AgentProcess("--features", "l4", "--node-name", "node-t", "--kubernetes", "off", "--grpc-listen", addr,
                             "--grpc-tls-cert", srv_crt, "--grpc-tls-key", srv_key, "--grpc-tls-client-ca", ca_crt)
        with running(agent):
            # the good relay also serves its own port with TLS (the agent's certificate stands in)
            good = RelayProcess("--agents", addr, "--tls-ca", ca_crt, "--tls-cert", cli_crt, "--tls-key", cli_key,
                                "--grpc-tls-cert", srv_crt, "--grpc-tls-key", srv_key)
            wrong_ca = RelayProcess("--agents", addr, "--tls-ca", other_crt, "--tls-cert", cli_crt, "--tls-key", cli_key)
            rogue_client = RelayProcess("--agents", addr, "--tls-ca", ca_crt, "--tls-cert", rogue_crt,
                                        "--tls-key", rogue_key)
            no_cert = RelayProcess("--agents", addr, "--tls-ca", ca_crt)
            with good, wrong_ca, rogue_client, no_cert:
                creds = grpc.ssl_channel_credentials(Path(ca_crt).read_bytes())
                assert wait_until(lambda: status(good.addr, creds).num_connected_nodes == 1, timeout=15), good.log()
                out = subprocess.run([MESHLENS, "status", "--server", f"grpcs://{good.addr}", "--tls-ca", ca_crt],
                                     capture_output=True, text=True, timeout=30)
                assert out.returncode == 0, out.stderr
                assert re.search(r"node-t\s+127\.0\.0\.1:\d+\s+NODE_CONNECTED\s+tls=yes", out.stdout), out.stdout
                plain = subprocess.run([MESHLENS, "status", "--server", good.addr], capture_output=True, text=True,
                                       timeout=30)
                assert plain.returncode == 1, plain.stdout   # a TLS port refuses a plain-text client
                for relay in (wrong_ca, rogue_client, no_cert):
                    assert wait_until(lambda: nodes(relay.addr)[0].message, timeout=15), relay.log()
                    [n] = nodes(relay.addr)
                    assert n.state == pb.Node.NODE_UNAVAILABLE and n.seen_flows == 0, (relay.args, n)
                    st = status(relay.addr)
                    assert st.num_connected_nodes == 0 and st.num_unavailable_nodes == 1
                time.sleep(1.0)         # still refused after the reconnects
                assert all(status(r.addr).num_connected_nodes == 0 for r in (wrong_ca, rogue_client, no_cert))
                # a plain-text client is refused by the TLS port too
                with pytest.raises(grpc.RpcError):
                    status(addr)
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
