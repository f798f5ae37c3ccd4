"""What one agent's flow stream carries, against ground truth from the tools themselves: one
simulated node (grpc_cluster.SimNode: a client pod and an nginx pod, a real agent with the
gRPC Observer, Kubernetes names from the fake API server) plus a dnsmasq pod and a pod where
nothing answers DNS.

- DNS: one flow per answered lookup, equal to dnsmasq's own log (`--log-queries=extra`: the
  client's address/port, name, type and every answer record), and one per unanswered query
  once the agent's DNS timeout has passed, equal to what the client sent and never got back.
- HTTP: the client's address and port on both sides' flows, equal to nginx's $remote_port
  and to the client's own getsockname().
- L4: the RTT of an open connection, inbound and outbound, equal to `ss -ti`'s rtt of the
  same socket."""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List

import pytest

from meshlens.exporter.proto import observer_pb2 as pb
from tests.integration.grpc_cluster import NAMESPACE, Follower, SimNode, wait_until
from tests.integration.l7_helpers import run_py
from tests.integration.pods import Pod
from tests.integration.servers import Dnsmasq, Nginx
from tests.unit.fake_apiserver import FakeApiServer, kubeconfig, pod_object

NODE = "node-f"
RECORDS = {"web.flows.test": ["10.9.0.1"], "db.flows.test": ["10.9.0.2", "10.9.0.3", "fd00::9"]}
DNS_TIMEOUT_S = 10.0    # the agent's (agent/sources/l7/dns.DnsTracker's default)

# One UDP socket per query (its own port); prints one JSON line per query: the client's own
# view (address/port from getsockname, id, rcode, answers, the round trip it measured).
DNS_CLIENT = r'''
import json, random, socket, struct, sys, time
server, timeout, plan = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
TYPES = {"A": 1, "AAAA": 28}
RCODES = {0: "NoError", 3: "NXDomain"}
for name, qtype in plan:
    qid = random.randrange(1, 0x10000)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack("!HH", TYPES[qtype], 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((server, 53))
    addr, port = s.getsockname()
    t0 = time.perf_counter()
    s.send(q)
    try:
        r = s.recv(4096)
        rtt = time.perf_counter() - t0
        rid, flags, _, ancount = struct.unpack("!HHHH", r[:8])
        out = {"answered": rid == qid, "rcode": RCODES.get(flags & 15, str(flags & 15)), "answers": ancount, "rtt": rtt}
    except (socket.timeout, ConnectionRefusedError) as exc:   # no server: ICMP port unreachable
        out = {"answered": False, "error": type(exc).__name__}
    s.close()
    print(json.dumps({"name": name, "qtype": qtype, "id": qid, "addr": addr, "port": port, **out}), flush=True)
'''

# Keep-alive HTTP over several connections: [n requests per connection]; prints per connection
# its local address and port (getsockname) and the statuses it got.
HTTP_CLIENT = r'''
import http.client, json, sys
host, plan = sys.argv[1], json.loads(sys.argv[2])
out = []
for n in plan:
    c = http.client.HTTPConnection(host, 80, timeout=10)
    c.connect()
    addr, port = c.sock.getsockname()
    got = []
    for i in range(n):
        c.request("GET", "/status/200" if i % 4 else "/status/404")
        r = c.getresponse(); r.read()
        got.append(r.status)
    c.close()
    out.append({"addr": addr, "port": port, "statuses": got})
print(json.dumps(out))
'''

# Connects, prints its address/port, then holds the connection open (no byte sent) until stdin closes.
HOLD_CLIENT = r'''
import socket, sys
s = socket.create_connection((sys.argv[1], 80))
print("%s %d" % s.getsockname(), flush=True)
sys.stdin.read()
s.close()
'''


@dataclass
class Env:
    l7_source: str
    sim: SimNode
    dns: Pod
    quiet: Pod
    dnsmasq: Dnsmasq
    dns_pod: str
    quiet_pod: str


@pytest.fixture(scope="module", params=["auto", "syscalls"])
def env(request) -> Iterator[Env]:
    """The agent's default L7 path (packets at the pod veths) and the syscall path."""
    sim = SimNode(NODE)
    dnsmasq = None
    try:
        dns = sim.node.add_pod("dns-f", NAMESPACE, uid=str(uuid.uuid4()))
        quiet = sim.node.add_pod("quiet-f", NAMESPACE, uid=str(uuid.uuid4()))
        objects = sim.objects() + [pod_object(f"{p.name}-0", NAMESPACE, p.uid, p.ipv4, node=NODE,
                                              container_id=p.container_id) for p in (dns, quiet)]
        with FakeApiServer(objects) as api:
            with tempfile.TemporaryDirectory(prefix="meshlens-flows-") as tmp:
                kc = f"{tmp}/kubeconfig"
                kubeconfig(kc, api.url)
                sim.nginx = Nginx(sim.web)
                dnsmasq = Dnsmasq(dns, RECORDS, log_extra=True)
                sim.start_agent(kc, "--l7-source", request.param)
                assert wait_until(sim.synced, timeout=30), "identity watch not synced"
                yield Env(request.param, sim, dns, quiet, dnsmasq, f"{dns.name}-0", f"{quiet.name}-0")
    finally:
        if dnsmasq is not None:
            dnsmasq.stop()
        sim.close()


def follow(env: Env, **flt) -> Follower:
    f = Follower(env.sim.grpc_addr, pb.GetFlowsRequest(follow=True, whitelist=[pb.FlowFilter(**flt)]))
    time.sleep(1.0)     # the first follower switches the kernel on (follow mode, tap) as it subscribes
    return f


# ---------------------------------------------------------------------------------- DNS


def dnsmasq_lookups(lines: List[str]) -> Dict[int, dict]:
    """dnsmasq's --log-queries=extra lines grouped by query serial: client, name, type, answers."""
    out: Dict[int, dict] = {}
    pat = re.compile(r"dnsmasq\[\d+\]: (\d+) ([0-9a-f.:]+)/(\d+) (\S+) (.*)$")
    for line in lines:
        m = pat.search(line)
        if not m:
            continue
        serial, addr, port, what, rest = int(m[1]), m[2], int(m[3]), m[4], m[5]
        if what.startswith("query["):
            out[serial] = {"addr": addr, "port": port, "qtype": what[6:-1], "name": rest.split(" from ")[0],
                           "answers": 0, "rcode": "NoError"}
        elif what == "config" and serial in out:
            value = rest.rsplit(" is ", 1)[1]
            if value == "NXDOMAIN":
                out[serial]["rcode"] = "NXDomain"
            elif not value.startswith("NODATA"):
                out[serial]["answers"] += 1
    return out


def test_dns_flows_equal_dnsmasq_log_and_unanswered_ones_time_out(env: Env) -> None:
    client = env.sim.client
    f = follow(env, protocol="dns")
    try:
        n_log = len(env.dnsmasq.log_lines())
        # two queries to a pod where nothing serves DNS: the client gives up after 0.3 s; the
        # agent names them unanswered once its own timeout has passed
        silent = [json.loads(x) for x in run_py(client, DNS_CLIENT, env.quiet.ipv4, "0.3", json.dumps(
            [["lost-1.flows.test", "A"], ["lost-2.flows.test", "AAAA"]])).splitlines()]
        given_up = time.monotonic()
        assert [q["answered"] for q in silent] == [False, False]
        # 13 A + 7 AAAA + 3 NXDOMAIN, every one on its own socket
        plan = ([["web.flows.test", "A"]] * 7 + [["db.flows.test", "A"]] * 6 + [["db.flows.test", "AAAA"]] * 4
                + [["web.flows.test", "AAAA"]] * 3 + [["nope-1.flows.test", "A"], ["nope-2.flows.test", "AAAA"],
                                                      ["nope-3.flows.test", "A"]])
        asked = [json.loads(x) for x in run_py(client, DNS_CLIENT, env.dns.ipv4, "3", json.dumps(plan)).splitlines()]
        assert len(asked) == 23 and all(q["answered"] for q in asked)
        truth = dnsmasq_lookups(env.dnsmasq.log_lines()[n_log:])
        assert len(truth) == 23, truth            # dnsmasq saw each query once, and only these

        def answers() -> List[pb.Flow]:
            return [x for x in f.flows() if x.l7.dns.query and not x.l7.dns.timed_out]

        def timeouts() -> List[pb.Flow]:
            return [x for x in f.flows() if x.l7.dns.timed_out]
        assert wait_until(lambda: len(answers()) >= 23, timeout=15), len(answers())
        # equal to dnsmasq's log: client port, name, type, rcode, answer records
        got = collections.Counter((x.destination.port, x.l7.dns.query, x.l7.dns.qtype, x.l7.dns.rcode,
                                   x.l7.dns.answer_count) for x in answers())
        want = collections.Counter((t["port"], t["name"] + ".", t["qtype"], t["rcode"], t["answers"])
                                   for t in truth.values())
        assert got == want
        assert collections.Counter((x.l7.dns.qtype, x.l7.dns.rcode) for x in answers()) == {
            ("A", "NoError"): 13, ("AAAA", "NoError"): 7, ("AAAA", "NXDomain"): 1, ("A", "NXDomain"): 2}
        # one socket per query, but the kernel may hand two of them the same ephemeral port:
        # a flow is matched to its query by the client's port, name, type and the message id
        by_query = collections.defaultdict(list)
        for q in asked:
            by_query[(q["port"], q["name"] + ".", q["qtype"], q["id"])].append(q)
        for x in answers():
            (q,) = by_query[(x.destination.port, x.l7.dns.query, x.l7.dns.qtype, x.l7.dns.id)]
            assert x.is_reply and x.traffic_direction == pb.EGRESS and x.node_name == NODE
            assert (x.source.pod_name, x.source.namespace, x.source.ip, x.source.port) == (
                env.dns_pod, NAMESPACE, env.dns.ipv4, 53)
            assert q["addr"] == client.ipv4
            assert (x.destination.pod_name, x.destination.ip) == (env.sim.client_pod, client.ipv4)
            assert x.l7.dns.id == q["id"] and x.l7.dns.rcode == q["rcode"] and x.l7.dns.answer_count == q["answers"]
            # measured at the client's veth: after the client sent, before it received
            assert 0 < x.l7.dns.latency_seconds <= q["rtt"], (x.l7.dns.latency_seconds, q["rtt"])
        # the two unanswered queries, once the agent's timeout has passed: named, from the client's socket
        assert wait_until(lambda: len(timeouts()) >= 2, timeout=DNS_TIMEOUT_S + 8), f.flows()[-3:]
        assert time.monotonic() - given_up >= DNS_TIMEOUT_S - 1.0
        assert sorted((x.source.port, x.l7.dns.query, x.l7.dns.qtype, x.l7.dns.id) for x in timeouts()) == sorted(
            (q["port"], q["name"] + ".", q["qtype"], q["id"]) for q in silent)
        for x in timeouts():
            assert not x.is_reply and x.l7.dns.rcode == "" and x.l7.dns.answer_count == 0
            assert (x.source.pod_name, x.source.ip) == (env.sim.client_pod, client.ipv4)
            assert (x.destination.pod_name, x.destination.ip, x.destination.port) == (env.quiet_pod, env.quiet.ipv4, 53)
        assert not any("lost-" in line for line in env.dnsmasq.log_lines())   # dnsmasq never saw them
        time.sleep(1.0)
        assert len(answers()) == 23 and len(timeouts()) == 2    # each exactly once
    finally:
        f.close()


# ---------------------------------------------------------------------------------- HTTP


def test_http_flows_carry_the_clients_port_equal_to_nginx_and_getsockname(env: Env) -> None:
    sim = env.sim
    assert sim.nginx is not None
    f = follow(env, protocol="http")
    try:
        before = len(sim.nginx.access_log_entries())
        plan = [5, 7, 11]
        conns = json.loads(run_py(sim.client, HTTP_CLIENT, sim.web.ipv4, json.dumps(plan)).strip().splitlines()[-1])
        total = sum(plan)
        entries = sim.nginx.access_log_entries(expect=before + total)[before:]
        assert len(entries) == total
        nginx_ports = collections.Counter(int(e["remote_port"]) for e in entries)
        own = collections.Counter({c["port"]: len(c["statuses"]) for c in conns})
        assert nginx_ports == own and sorted(own.values()) == plan
        assert {c["addr"] for c in conns} == {sim.client.ipv4}

        def side(direction: int, reply: bool) -> List[pb.Flow]:
            return [x for x in f.flows() if x.traffic_direction == direction and x.is_reply == reply]
        assert wait_until(lambda: all(len(side(d, r)) >= total for d in (pb.INGRESS, pb.EGRESS)
                                      for r in (False, True)), timeout=15), len(f.flows())
        for d in (pb.INGRESS, pb.EGRESS):
            reqs, resps = side(d, False), side(d, True)
            assert collections.Counter(x.source.port for x in reqs) == nginx_ports, d
            assert collections.Counter(x.destination.port for x in resps) == nginx_ports, d
            assert {(x.source.pod_name, x.source.ip) for x in reqs} == {(sim.client_pod, sim.client.ipv4)}, d
            assert {(x.destination.pod_name, x.destination.ip, x.destination.port) for x in reqs} == {
                (sim.web_pod, sim.web.ipv4, 80)}, d
            # per connection, the statuses of the client's own report (counted: the stream's
            # order between two polls of the tap is not guaranteed to the sub-millisecond)
            for c in conns:
                codes = collections.Counter(x.l7.http.code for x in resps if x.destination.port == c["port"])
                assert codes == collections.Counter(c["statuses"]), (d, c["port"])
    finally:
        f.close()


# ---------------------------------------------------------------------------------- L4 RTT


def ss_rtt_us(pod: Pod, local_port: int, peer_port: int) -> float:
    """`ss -ti` rtt (ms, the socket's srtt) of the one established socket local_port <-> peer_port, in µs."""
    out = pod.run(["ss", "-tinH", "state", "established", f"( sport = :{local_port} and dport = :{peer_port} )"]).stdout
    found = re.findall(r"\brtt:([0-9.]+)/", out)
    assert len(found) == 1, out
    return float(found[0]) * 1000.0


def test_open_connection_rtt_inbound_and_outbound_equals_ss(env: Env) -> None:
    """A connection held open with no byte sent after the handshake: each socket's srtt is its
    one handshake sample, unchanged since (no segment of data was acknowledged), so the open
    flow's RTT (read at ESTABLISHED) must equal `ss -ti`'s rtt exactly; the tolerance is ss's
    print resolution, 1 µs (it prints tcpi_rtt = srtt_us >> 3, in µs, as ms)."""
    sim = env.sim
    f = follow(env, type=pb.L4, port=80)
    hold = sim.client.popen([sys.executable, "-c", HOLD_CLIENT, sim.web.ipv4], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        addr, port = hold.stdout.readline().split()
        port_i = int(port)

        def opened(direction: int) -> List[pb.Flow]:
            return [x for x in f.flows() if x.l4.event == "open" and x.traffic_direction == direction
                    and x.source.port == port_i]
        assert wait_until(lambda: opened(pb.INGRESS) and opened(pb.EGRESS), timeout=10), f.flows()
        [inbound], [outbound] = opened(pb.INGRESS), opened(pb.EGRESS)
        server_ss = ss_rtt_us(sim.web, 80, port_i)
        client_ss = ss_rtt_us(sim.client, port_i, 80)
        assert inbound.l4.rtt_seconds > 0 and outbound.l4.rtt_seconds > 0
        assert abs(inbound.l4.rtt_seconds * 1e6 - server_ss) <= 1.0, (inbound.l4.rtt_seconds, server_ss)
        assert abs(outbound.l4.rtt_seconds * 1e6 - client_ss) <= 1.0, (outbound.l4.rtt_seconds, client_ss)
        assert (inbound.source.pod_name, inbound.destination.pod_name) == (sim.client_pod, sim.web_pod)
        assert addr == sim.client.ipv4 == inbound.source.ip
        # closing it: both close flows carry the srtt at close (the FIN exchange adds samples)
        hold.stdin.close()
        hold.wait(10)

        def closed() -> List[pb.Flow]:
            return [x for x in f.flows() if x.l4.event == "close" and x.source.port == port_i]
        assert wait_until(lambda: len(closed()) == 2, timeout=10), f.flows()
        assert all(x.l4.rtt_seconds > 0 for x in closed())
    finally:
        if hold.poll() is None:
            hold.kill()
            hold.wait(5)
        f.close()
