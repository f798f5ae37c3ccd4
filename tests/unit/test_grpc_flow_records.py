"""What the flow stream's records carry, without a kernel: DNS lookups handed to followers by
the DnsTracker (syscall path pairing, the packet path's ASKED records and kernel expiry) and
their Flow messages, the HTTP client's address and port, and the L4 RTT of either direction."""
from __future__ import annotations

import dataclasses
from typing import List

from meshlens.agent.sources.l7.dns import DnsLookup, DnsTracker, conn_key_hash
from meshlens.agent.sources.l7.structs import DNS_ANSWERED, DNS_ASKED, DNS_QUERY, DNS_RESPONSE, MlPktConnKey
from meshlens.exporter.grpc.convert import compile_filter, conn_flow, dns_flow, filter_from_params, http_flows
from meshlens.exporter.proto import observer_pb2 as pb
from tests.unit.grpc_fakes import conn, tap
from tests.unit.test_grpc_observer import API, FRONTEND, IDENT
from tests.unit.test_l7_userspace import dns_event, dns_msg

SEC = 1_000_000_000


def client_end(ev, addr: str = "10.1.0.2", port: int = 40123):
    ev.client_addr[:4] = [int(x) for x in addr.split(".")]
    ev.client_port = port
    return ev


def followed(t: DnsTracker) -> List[DnsLookup]:
    got: List[DnsLookup] = []
    t.subscribe(got.append)
    return got


def test_syscall_path_lookups_reach_followers_answered_and_timed_out() -> None:
    t = DnsTracker(timeout_s=1.0)
    t.on_event(client_end(dns_event(DNS_QUERY, dns_msg(1, "a.test", 1), 5)))    # before anyone follows
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(1, "a.test", 1, True, 0, 1), 7))
    got = followed(t)
    assert got == []
    t.on_event(client_end(dns_event(DNS_QUERY, dns_msg(2, "b.test", 28), 1_000)))
    t.on_event(client_end(dns_event(DNS_QUERY, dns_msg(3, "c.test", 1), 2_000)))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(2, "b.test", 28, True, 3, 0), 2_501_000))
    t.sweep(2 * SEC)
    assert [(g.answered, g.query, g.qtype, g.rcode, g.txid) for g in got] == [
        (True, "b.test.", "AAAA", "NXDomain", 2), (False, "c.test.", "A", "", 3)]
    ans, lost = got
    assert (ans.ts_ns, ans.query_ts_ns, ans.latency_s) == (2_501_000, 1_000, 0.0025)
    assert (ans.process, ans.server_address, ans.server_port) == ("getent", "10.0.0.53", 53)
    assert (ans.client_address, ans.client_port) == ("10.1.0.2", 40123)
    assert (lost.ts_ns, lost.latency_s, lost.answers) == (2 * SEC, 0.0, 0)
    assert t.unanswered == 1 and t.snapshot().queries == 3   # the metrics are unchanged by following


def test_packet_path_names_an_unanswered_query_from_its_asked_record() -> None:
    t = DnsTracker(timeout_s=1.0)
    conn_key = MlPktConnKey(local_port=40123, peer_port=53, ifindex=9, family=2)
    conn_key.local_addr[:4] = [10, 1, 0, 2]
    conn_key.peer_addr[:4] = [10, 0, 0, 53]
    sk = conn_key_hash(bytes(conn_key))
    t.on_event(dns_event(DNS_ASKED, dns_msg(7, "gone.test", 1), 10, sk=sk, cgroup=0))   # nobody follows: dropped
    got = followed(t)
    t.kernel_expired(sk, 7, SEC)
    assert got == []
    t.on_event(client_end(dns_event(DNS_ASKED, dns_msg(7, "gone.test", 1), 100, sk=sk, cgroup=0)))
    t.on_event(client_end(dns_event(DNS_ASKED, dns_msg(8, "fine.test", 28), 200, sk=sk, cgroup=0)))
    ans = client_end(dns_event(DNS_ANSWERED, dns_msg(8, "fine.test", 28, True, 0, 2), 900_200, sk=sk, cgroup=0))
    ans.duration_ns = 900_000
    t.on_event(ans)
    t.kernel_expired(sk, 7, 2 * SEC)
    t.kernel_expired(sk, 8, 2 * SEC)          # answered already: nothing more
    assert [(g.answered, g.query, g.answers, g.latency_s, g.ts_ns) for g in got] == [
        (True, "fine.test.", 2, 0.0009, 900_200), (False, "gone.test.", 0, 0.0, 2 * SEC)]
    assert got[0].process == "getent" and got[0].client_port == 40123
    # the series are as before: no process on the packet path; ASKED records count no query
    snap = t.snapshot()
    assert {k.process for k in snap.series} == {""} and snap.queries == 0


def test_asked_records_are_bounded_and_forgotten_without_followers() -> None:
    t = DnsTracker(max_pending=2, timeout_s=1.0)
    unsubscribe = t.subscribe(lambda lk: None)
    for i in range(3):
        t.on_event(dns_event(DNS_ASKED, dns_msg(i, f"n{i}.test", 1), 0))
    assert len(t._asked) == 2 and t.asked_evicted == 1
    t.sweep(3 * SEC)                           # twice the timeout without a word: forgotten
    assert len(t._asked) == 0
    t.on_event(dns_event(DNS_ASKED, dns_msg(9, "x.test", 1), 0))
    unsubscribe()
    assert not t.followed
    t.on_event(dns_event(DNS_ASKED, dns_msg(10, "y.test", 1), 0))   # no longer kept
    assert len(t._asked) == 1
    t.sweep(0)                                   # the reader's thread forgets the rest
    assert len(t._asked) == 0


def test_a_failing_follower_is_counted_not_raised() -> None:
    t = DnsTracker()

    def boom(lk):
        raise ValueError("no")
    t.subscribe(boom)
    t.on_event(dns_event(DNS_QUERY, dns_msg(1, "a.test", 1), 0))
    t.on_event(dns_event(DNS_RESPONSE, dns_msg(1, "a.test", 1, True), 1))
    assert t.follow_errors == 1 and sum(st.count for st in t.snapshot().series.values()) == 1


def lookup(answered: bool) -> DnsLookup:
    return DnsLookup(ts_ns=2 * SEC, query_ts_ns=SEC, answered=answered, query="db.shop.test.", qtype="A",
                     rcode="NoError" if answered else "", answers=2 if answered else 0,
                     latency_s=0.00042 if answered else 0.0, txid=4099, process="", cgroup_id=0, netns=101,
                     server_address="10.1.0.3", server_port=53, client_address="10.1.0.2", client_port=40123)


def test_dns_flows_as_hubble_shows_them() -> None:
    ans = dns_flow(lookup(True), IDENT, "node-a", 5 * SEC)
    assert ans.type == pb.L7 and ans.is_reply and ans.traffic_direction == pb.EGRESS
    assert (ans.source.pod_name, ans.source.ip, ans.source.port) == (API.pod, "10.1.0.3", 53)
    assert (ans.destination.pod_name, ans.destination.ip, ans.destination.port) == (FRONTEND.pod, "10.1.0.2", 40123)
    d = ans.l7.dns
    assert (d.query, d.qtype, d.rcode, d.answer_count, d.latency_seconds, d.timed_out, d.id) == (
        "db.shop.test.", "A", "NoError", 2, 0.00042, False, 4099)
    assert ans.time.ToNanoseconds() == 5 * SEC
    q = dns_flow(lookup(False), IDENT, "node-a", 6 * SEC)
    assert not q.is_reply and q.l7.dns.timed_out and q.l7.dns.rcode == ""
    assert (q.source.pod_name, q.source.port, q.destination.pod_name, q.destination.port) == (
        FRONTEND.pod, 40123, API.pod, 53)
    assert "unanswered" in q.summary
    for params, want in (({"protocol": "dns"}, 1), ({"protocol": "http"}, 0), ({"port": 53}, 1),
                         ({"from_pod": "frontend"}, 1), ({"to_pod": "api"}, 1), ({"type": "L4"}, 0)):
        c = compile_filter(filter_from_params(params))
        assert [int(c.matches(f)) for f in (ans, q)] == [want, want], params


def test_http_flows_carry_the_clients_address_and_port() -> None:
    rec = tap(102, "server", "GET", 200, "/", "10.1.0.3", 80, "10.1.0.2")
    rec = dataclasses.replace(rec, client_address="10.1.0.2", client_port=40999)
    req, resp = http_flows(rec, IDENT, "node-a", SEC)
    assert (req.source.ip, req.source.port, req.destination.port) == ("10.1.0.2", 40999, 80)
    assert (resp.destination.ip, resp.destination.port) == ("10.1.0.2", 40999)
    crec = tap(101, "client", "GET", 200, "/", "10.1.0.3", 80, "10.1.0.3")
    crec = dataclasses.replace(crec, client_address="10.1.0.2", client_port=41001)
    creq, _ = http_flows(crec, IDENT, "node-a", SEC)
    assert (creq.source.pod_name, creq.source.ip, creq.source.port) == (FRONTEND.pod, "10.1.0.2", 41001)


def test_l4_rtt_is_the_sockets_srtt_in_either_direction() -> None:
    inbound = conn_flow(conn("open", 102, "inbound", "10.1.0.3", 80, "10.1.0.2", 40001, rtt_s=0.000061),
                        IDENT, "node-a", SEC)
    assert inbound.l4.rtt_seconds == 0.000061
    outbound = conn_flow(conn("open", 101, "outbound", "10.1.0.2", 40001, "10.1.0.3", 80, rtt_s=0.000052,
                              connect_latency_s=0.0003), IDENT, "node-a", SEC)
    assert outbound.l4.rtt_seconds == 0.000052
    # no srtt from the kernel: the connect latency outbound, 0 inbound (as before)
    assert conn_flow(conn("open", 101, "outbound", "10.1.0.2", 1, "10.1.0.3", 80, connect_latency_s=0.0003),
                     IDENT, "node-a", SEC).l4.rtt_seconds == 0.0003
    assert conn_flow(conn("open", 102, "inbound", "10.1.0.3", 80, "10.1.0.2", 1), IDENT, "node-a",
                     SEC).l4.rtt_seconds == 0.0

