"""User-space L7 logic without a kernel: DNS pairing and timeouts with fake records, the
HTTP source's handling of ring-buffer records, and the metric families on a fake snapshot."""
from __future__ import annotations

from meshlens.agent.identity.model import Workload, external

import ctypes
import struct

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from meshlens.agent.sources.l7.dns import DnsTracker
from meshlens.agent.sources.histogram import Histogram
from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSnapshot, HttpSource, HttpStats
from meshlens.agent.sources.l7.structs import (
    DNS_ANSWERED,
    DNS_QUERY,
    DNS_RESPONSE,
    DURATION_BOUNDS_S,
    EV_DNS,
    EV_HTTP_REQUEST,
    EV_PATH,
    F_OVERFLOW,
    F_RESP_SIZE,
    MlDnsEvent,
    MlHttpEvent,
    MlPathEvent,
)
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.exporter.prometheus.dns import dns_families
from meshlens.exporter.prometheus.http import http_families


def dns_msg(txid: int, name: str, qtype: int, response: bool = False, rcode: int = 0, an: int = 0) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    flags = (0x8180 | rcode) if response else 0x0100
    return struct.pack("!HHHHHH", txid, flags, 1, an, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def dns_event(direction: int, payload: bytes, ts_ns: int, sk: int = 0xFFFF1, cgroup: int = 42) -> MlDnsEvent:
    ev = MlDnsEvent(type=EV_DNS, len=len(payload), ts_ns=ts_ns, sk=sk, cgroup_id=cgroup, netns=7, tgid=1,
                    server_port=53, family=2, dir=direction, comm=b"getent")
    ev.server_addr[:4] = [10, 0, 0, 53]
    ctypes.memmove(ev.payload, payload, len(payload))
    return ev


def test_dns_pairs_by_socket_and_txid_and_times() -> None:
    t = DnsTracker()
    t.on_event(dns_event(DNS_QUERY, dns_msg(1, "a.test", 1), 1_000_000))
    t.on_event(dns_event(DNS_QUERY, dns_msg(2, "a.test", 28), 1_000_000))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(2, "a.test", 28, True, 0, 0), 3_000_000))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(1, "a.test", 1, True, 0, 2), 5_000_000))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(9, "a.test", 1, True, 3), 5_000_000))   # nobody asked
    snap = t.snapshot()
    got = {(k.question_type, k.response_code): (st.count, st.answers, st.duration.total) for k, st in snap.series.items()}
    assert got == {("A", "NoError"): (1, 2, 0.004), ("AAAA", "NoError"): (1, 0, 0.002)}
    assert snap.unmatched_responses == 1
    k = next(iter(snap.series))
    assert (k.server_address, k.server_port, k.process, k.question_name) == ("10.0.0.53", 53, "getent", "a.test.")


def test_dns_paired_in_the_kernel_and_kernel_counts() -> None:
    """Packet path: the kernel sends answered lookups only, with their latency; its counts of
    queries, unmatched, malformed and unanswered add to the tracker's own."""
    t = DnsTracker()
    ev = dns_event(DNS_ANSWERED, dns_msg(5, "b.test", 28, True, 3, 0), 9_000_000, cgroup=0)
    ev.duration_ns = 1_500_000
    t.on_event(ev)
    t.on_event(dns_event(DNS_ANSWERED, dns_msg(6, "b.test", 28), 9_000_000, cgroup=0))  # not a response
    t.kernel_totals("pkt", {"queries": 7, "unmatched": 2, "malformed": 1, "unanswered": 3})
    t.kernel_totals("pkt", {"queries": 9, "unmatched": 2, "malformed": 1, "unanswered": 4})  # cumulative: replaces
    snap = t.snapshot()
    got = {(k.question_type, k.response_code, k.question_name, k.process): (st.count, st.duration.total)
           for k, st in snap.series.items()}
    assert got == {("AAAA", "NXDomain", "b.test.", ""): (1, 0.0015)}
    assert (snap.queries, snap.unmatched_responses, snap.malformed, snap.unanswered) == (9, 2, 2, 4)


def test_dns_timeouts_and_bounds() -> None:
    t = DnsTracker(max_pending=2, timeout_s=1.0, max_names_per_workload=1)
    for i in range(3):
        t.on_event(dns_event(DNS_QUERY, dns_msg(i, f"n{i}.test", 1), 0))
    assert t.unanswered == 1                      # evicted: bounded pending table
    t.sweep(2_000_000_000)
    assert t.unanswered == 3                      # the rest timed out
    t.on_event(dns_event(DNS_QUERY, b"\x00" * 5, 0))
    assert t.malformed == 1
    for i, name in enumerate(["x.test", "y.test"]):
        t.on_event(dns_event(DNS_QUERY, dns_msg(10 + i, name, 1), 0))
        t.on_event(dns_event(DNS_RESPONSE, dns_msg(10 + i, name, 1, True), 1))
    assert {k.question_name for k in t.snapshot().series} == {"x.test.", "__overflow__"}


def test_http_source_records_without_kernel() -> None:
    src = HttpSource.__new__(HttpSource)   # no BPF object: feed records by hand
    HttpSource.__init__(src, features=object())  # type: ignore[arg-type]
    p = MlPathEvent(type=EV_PATH, path_id=99, len=8)
    p.path = b"/users/5"
    src._on_event(bytes(p))
    ev = MlHttpEvent(type=EV_HTTP_REQUEST, flags=F_OVERFLOW | F_RESP_SIZE, duration_ns=60_000_000, resp_body=10)
    ev.key.path_id, ev.key.status, ev.key.role, ev.key.method, ev.key.cgroup_id = 99, 200, 1, 1, 5
    ev.key.family, ev.key.server_port, ev.key.comm = 2, 80, b"nginx"
    src._on_event(bytes(ev))
    src._on_event(b"\x07\x00\x00\x00junk")
    assert src.decode_errors == 1
    (key, st), = src._retired.items()
    assert (key.route, key.method, key.status, key.role, key.process) == ("/users/{id}", "GET", 200, "server", "nginx")
    assert st.count == 1 and st.duration.counts[4] == 1 and st.response_body.total == 10


def _snapshot(http: HttpSnapshot, dns) -> AgentSnapshot:
    return AgentSnapshot(areas={"http": http, "dns": dns}, health={}, attach={},
                         process=ProcessStats(0, 0, 0), cgroup_path=lambda i: f"/pod{i}")


class _Fixed(Collector):
    def __init__(self, fams) -> None:
        self.fams = list(fams)

    def collect(self):
        return self.fams


def standalone_local(process: str) -> dict:
    """Identity labels of the local side without Kubernetes: the process names it."""
    return Workload("", "", "process", process).local_labels()


def standalone_peer(address: str) -> dict:
    return external(address).peer_labels()


def test_metric_families() -> None:
    st = HttpStats()
    st.count = 2
    st.duration = Histogram(DURATION_BOUNDS_S, [0, 0, 0, 0, 2] + [0] * 10, 0.12, 2)
    k_srv = HttpSeriesKey("server", "nginx", 5, 7, "GET", 200, "/delay", "10.0.0.2", 80)
    k_cli = HttpSeriesKey("client", "curl", 6, 8, "GET", 200, "/delay", "10.0.0.2", 80)
    http = HttpSnapshot({k_srv: st, k_cli: st}, {"not_http": 3}, 0, 0)
    t = DnsTracker()
    t.on_event(dns_event(DNS_QUERY, dns_msg(1, "a.test", 1), 0))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(1, "a.test", 1, True, 3), 1000))
    snap = _snapshot(http, t.snapshot())
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed(list(http_families(snap)) + list(dns_families(snap))))
    srv = {"http_request_method": "GET", "http_response_status_code": "200", "http_route": "/delay",
           "server_port": "80", "process": "nginx", "cgroup": "/pod5", "netns": "7", **standalone_local("nginx")}
    assert reg.get_sample_value("http_server_request_duration_seconds_count", srv) == 2
    assert reg.get_sample_value("http_server_request_duration_seconds_bucket", {**srv, "le": "0.05"}) == 0
    assert reg.get_sample_value("http_server_request_duration_seconds_bucket", {**srv, "le": "0.075"}) == 2
    cli = {**srv, "process": "curl", "cgroup": "/pod6", "netns": "8", "server_address": "10.0.0.2",
           **standalone_local("curl"), **standalone_peer("10.0.0.2")}
    assert reg.get_sample_value("http_client_request_duration_seconds_count", cli) == 2
    assert reg.get_sample_value("meshlens_http_parse_errors_total", {"reason": "not_http"}) == 3
    dns = {"dns_question_type": "A", "dns_response_code": "NXDomain", "dns_question_name": "a.test.",
           "server_address": "10.0.0.53", "server_port": "53", "process": "getent", "cgroup": "/pod42", "netns": "7",
           **standalone_local("getent"), **standalone_peer("10.0.0.53")}
    assert reg.get_sample_value("meshlens_dns_requests_total", dns) == 1
    assert reg.get_sample_value("meshlens_dns_request_duration_seconds_count", dns) == 1
