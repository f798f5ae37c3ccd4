"""The chain of one filter per hook under BPF_PROG_TEST_RUN: bpf/tc.bpf.c's counter programs
with programs in their `l7_progs`, as agent/sources/tc/chain.py installs them.

Which frames the counters hand on is checked with a probe: a second copy of the counter
programs sits in `l7_progs`, and its own per-interface counters say how many frames the
chain passed it. A bare ACK (a whole, untagged, unfragmented TCP segment without payload or
SYN/FIN/RST) is not handed on; everything else is, exactly as before: UDP, VLAN and QinQ,
IPv6 extension headers, fragments, frames the counters could not parse. Then the real packet
L7 parser in the chain: a keep-alive conversation counts every request once and moves every
L7 counter exactly as the parser alone does on the same frames; a bare ACK changes no L7 map
and no counter but the interface's; a frame the counters could not parse still reaches the
parser and is counted there as unparsed. Root: loads BPF objects.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Tuple

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.l7.structs import L7PktRodata
from meshlens.agent.sources.tc.structs import EGRESS, INGRESS
from tests.integration import tc_packets as pk
from tests.integration import test_l7pkt_prog_run as l7t
from tests.integration.test_tc_prog_run import Harness as TcHarness
from tests.integration.test_tc_prog_run import _load as load_tc

SLOT = {INGRESS: 0, EGRESS: 1}   # l7_progs index = the counter program's direction
MAGIC, CHECK = 0x6D6C3768, 0x2F7C0BE1   # bpf/include/tc_handoff.h


def handoff_ctx(frame_len: int, l4: int, payload_off: int, payload_len: int, family: int, flags: int,
                magic: int = MAGIC) -> bytes:
    """A struct __sk_buff prefix whose cb holds a handoff (tc_handoff.h) for BPF_PROG_TEST_RUN."""
    w1, w2, w3 = l4 | payload_off << 16, payload_len, family | flags << 8
    return bytes(48) + struct.pack("<5I", magic ^ frame_len, w1, w2, w3, w1 ^ w2 ^ w3 ^ CHECK)


def _fill(tc: bpf.BpfObject, progs: Dict[int, bpf.Program]) -> None:
    m = tc.map("l7_progs")
    for direction, prog in progs.items():
        m.update_raw(SLOT[direction].to_bytes(4, "little"), prog.fd.to_bytes(4, "little"))


class Probe:
    """Counters under test (`head`) chained to a second copy of them (`tail`)."""

    def __init__(self) -> None:
        self.head_obj, self.tail_obj = load_tc(), load_tc()
        self.head, self.tail = TcHarness(self.head_obj), TcHarness(self.tail_obj)
        _fill(self.head_obj, {d: p for d, p in self.tail.progs.items()})

    def handed_on(self, data: bytes, direction: int) -> Tuple[int, int]:
        """(frames the head counted, frames the chain passed to the tail) for one run."""
        before = self.tail._stats()[direction]["packets"]
        d = self.head.run(data, direction)
        return d.stats[direction]["packets"], self.tail._stats()[direction]["packets"] - before

    def close(self) -> None:
        self.head_obj.close()
        self.tail_obj.close()


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    p = Probe()
    try:
        yield p
    finally:
        p.close()


def _padded_ack() -> bytes:
    # IPv4 says 40 bytes; the frame carries 6 more (Ethernet padding that looks like a request)
    return pk.tcp4(flags=pk.ACK).data + b"GET / "


BARE_ACKS: List[Tuple[str, bytes]] = [
    ("ipv4", pk.tcp4(flags=pk.ACK).data),
    ("ipv4-psh-no-payload", pk.tcp4(flags=pk.ACK | pk.PSH).data),
    ("ipv4-timestamps", pk.tcp4(flags=pk.ACK, tcp_options=b"\x01\x01\x08\x0a" + b"\x00" * 8).data),
    ("ipv4-ip-options", pk.tcp4(flags=pk.ACK, ip_options=b"\x01" * 4).data),
    ("ipv4-ethernet-padding", _padded_ack()),
    ("ipv6", pk.tcp6(flags=pk.ACK).data),
]


def _big_tcp_ack() -> bytes:
    th = pk.tcp_header(40000, 80, pk.ACK)
    return pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(th), tot_len=0) + th


def _later_fragment() -> bytes:
    th = pk.tcp_header(1, 2, pk.ACK)
    return pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(th), frag_offset=185) + th


def _tcp_options_cut_off() -> bytes:
    th = pk.tcp_header(1, 2, pk.ACK, doff=15)
    return pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(th)) + th


HANDED_ON: List[Tuple[str, bytes]] = [
    ("ipv4-data", pk.tcp4(flags=pk.ACK | pk.PSH, payload=b"x").data),
    ("ipv6-data", pk.tcp6(flags=pk.ACK | pk.PSH, payload=b"GET / HTTP/1.1\r\n\r\n").data),
    ("syn", pk.tcp4(flags=pk.SYN, sport=41001).data),
    ("synack", pk.tcp4(flags=pk.SYN | pk.ACK, sport=41002).data),
    ("fin", pk.tcp4(flags=pk.FIN | pk.ACK).data),
    ("rst", pk.tcp4(flags=pk.RST).data),
    ("rst-ack", pk.tcp6(flags=pk.RST | pk.ACK).data),
    ("udp-dns", pk.udp4(29).data),
    ("vlan-ack", pk.tcp4(flags=pk.ACK, vlans=[(pk.ETH_P_8021Q, 100)]).data),
    ("qinq-ack", pk.tcp6(flags=pk.ACK, vlans=[(pk.ETH_P_8021AD, 10), (pk.ETH_P_8021Q, 20)]).data),
    ("ipv6-hop-by-hop-ack", pk.tcp6(flags=pk.ACK, exts=[(pk.HOP, {})]).data),
    ("ipv6-first-fragment-ack", pk.tcp6(flags=pk.ACK, exts=[(pk.FRAGMENT, {"more": True})]).data),
    ("ipv4-first-fragment-ack", pk.tcp4(flags=pk.ACK, more_fragments=True).data),
    ("ipv4-later-fragment", _later_fragment()),
    ("ipv4-big-tcp-ack", _big_tcp_ack()),
    ("tcp-options-cut-off", _tcp_options_cut_off()),
    ("arp", pk.ethernet(pk.ETH_P_ARP) + b"\x00" * 28),
]


@pytest.mark.parametrize("direction", [INGRESS, EGRESS])
@pytest.mark.parametrize("name,data", BARE_ACKS, ids=[n for n, _ in BARE_ACKS])
def test_bare_ack_is_counted_and_not_handed_on(probe: Probe, name: str, data: bytes, direction: int) -> None:
    assert probe.handed_on(data, direction) == (1, 0)
    probe.head.clear_handshakes()


@pytest.mark.parametrize("direction", [INGRESS, EGRESS])
@pytest.mark.parametrize("name,data", HANDED_ON, ids=[n for n, _ in HANDED_ON])
def test_everything_else_is_handed_on_once(probe: Probe, name: str, data: bytes, direction: int) -> None:
    assert probe.handed_on(data, direction) == (1, 1)
    probe.head.clear_handshakes()
    probe.tail.clear_handshakes()


# --------------------------------------------------------------------------- the real parser


class Chained(l7t.Harness):
    """test_l7pkt_prog_run's harness with its frames entering through the counter programs."""

    def __init__(self, obj: bpf.BpfObject, tc: bpf.BpfObject) -> None:
        super().__init__(obj)
        self.tc = TcHarness(tc)
        _fill(tc, {INGRESS: self.out, EGRESS: self.into})
        self.out, self.into = self.tc.progs[INGRESS], self.tc.progs[EGRESS]

    def l7_state(self) -> Tuple[object, ...]:
        return (sorted(self.obj.map("pkt_conns").items_raw()), sorted(self.obj.map("http_stats").items_raw()),
                sorted(self.obj.map("dns_pending").items_raw()), self.counters())


@pytest.fixture(scope="module")
def pair() -> Iterator[Tuple[Chained, l7t.Harness]]:
    """(the parser behind the counters, the parser alone): two loads, the same frames."""
    objs = [bpf.BpfObject(bpf.object_path("l7pkt")) for _ in range(2)]
    objs[0].set_rodata({"tc_chained": 1}, L7PktRodata)   # as the agent loads it for the chain
    tc = load_tc()
    try:
        for o in objs:
            o.load()
        yield Chained(objs[0], tc), l7t.Harness(objs[1])
    finally:
        tc.close()
        for o in objs:
            o.close()


REQS = 1009 // 100   # ten exchanges per conversation, keep-alive
BODY = b"y" * 4099
MSS = 1448           # a test-run frame must fit in a page: the request goes in several segments


def conversation(h: l7t.Harness, port: int, pod_is_client: bool) -> None:
    """Handshake, REQS request/response exchanges each ACKed both ways, FIN both ways."""
    c = l7t.Conv(h, port, pod_is_client).handshake()
    cprog, sprog = c._progs()
    h.run(cprog, c._client(l7t.ACK, b"", c.cseq))           # the handshake's last ACK
    for i in range(REQS):
        req = b"POST /u/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 4099\r\n\r\n" % i + BODY
        for off in range(0, len(req), MSS):
            c.send(req[off:off + MSS])
            h.run(sprog, c._server(l7t.ACK, b"", c.sseq))   # the server ACKs each segment
        c.reply(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated")
        h.run(cprog, c._client(l7t.ACK, b"", c.cseq))       # the client ACKs the response
    c.close()
    h.run(cprog, c._client(l7t.ACK, b"", c.cseq + 1))       # the last ACK of the close


@pytest.mark.parametrize("pod_is_client", [True, False], ids=["client", "server"])
def test_chained_parser_counts_as_the_parser_alone(pair: Tuple[Chained, l7t.Harness], pod_is_client: bool) -> None:
    chained, alone = pair
    for h in (chained, alone):
        h.reset()
    c0, a0 = chained.counters(), alone.counters()
    for h in (chained, alone):
        conversation(h, 31000 + pod_is_client, pod_is_client)
    want = {(l7t.role(pod_is_client), "POST", 201, 80): REQS}
    assert chained.requests() == want
    assert alone.requests() == want
    assert chained.body_sums() == alone.body_sums() == (REQS * len(BODY), REQS * 7)
    delta_c = {n: chained.counters()[n] - c0[n] for n in c0}
    delta_a = {n: alone.counters()[n] - a0[n] for n in a0}
    assert delta_c == delta_a
    head = len(b"POST /u/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 4099\r\n\r\n")
    segments = -(-(head + len(BODY)) // MSS) + 1          # the request's, and the response
    assert delta_c["http_requests"] == REQS and delta_c["pkt_segments"] == segments * REQS
    assert not chained.obj.map("pkt_conns").items_raw(), "the closed connection is gone"


def test_bare_ack_changes_no_l7_state(pair: Tuple[Chained, l7t.Harness]) -> None:
    h = pair[0]
    h.reset()
    c = l7t.Conv(h, 32000).handshake()
    c.send(l7t.REQ)                            # a request waits for its response
    before, tc_before = h.l7_state(), h.tc._stats()
    for direction, data in ((INGRESS, c._client(l7t.ACK, b"", c.cseq)), (EGRESS, c._server(l7t.ACK, b"", c.sseq))):
        h.run(h.tc.progs[direction], data)
    assert h.l7_state() == before
    tc_after = h.tc._stats()
    assert [tc_after[d]["packets"] - tc_before[d]["packets"] for d in (INGRESS, EGRESS)] == [1, 1]
    c.reply(l7t.RESP)                          # and the exchange still completes
    assert h.requests() == {(2, "GET", 200, 80): 1}


@pytest.mark.parametrize("name,data", [("tcp-options-cut-off", _tcp_options_cut_off()),
                                       ("bad-data-offset", pk.ethernet(pk.ETH_P_IP)
                                        + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, 20)
                                        + pk.tcp_header(1, 2, pk.ACK, doff=4))], ids=lambda v: v if isinstance(v, str) else "")
def test_frame_the_counters_could_not_parse_reaches_the_parser(pair: Tuple[Chained, l7t.Harness], name: str,
                                                                data: bytes) -> None:
    chained, alone = pair
    tc_before = chained.tc._stats()[INGRESS]
    for h, prog in ((chained, chained.out), (alone, alone.out)):
        before = h.counters()
        h.run(prog, data)
        after = h.counters()
        assert {n: after[n] - before[n] for n in after if after[n] != before[n]} == {"pkt_unparsed": 1}
    tc_after = chained.tc._stats()[INGRESS]
    assert {f: tc_after[f] - tc_before[f] for f in ("packets", "parse_failures")} == {"packets": 1, "parse_failures": 1}


def test_chained_ipv6_exchange(pair: Tuple[Chained, l7t.Harness]) -> None:
    def f6(src: str, dst: str, sport: int, dport: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
        th = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, flags, 65535, 0, 0)
        return pk.ethernet(pk.ETH_P_IPV6) + pk.ipv6_header(src, dst, pk.TCP, len(th) + len(payload)) + th + payload

    pod, peer = "fd00:9::2", "fd00:9::1"
    for h in pair:
        h.reset()
        h.run(h.out, f6(pod, peer, 46001, 8080, 10, l7t.SYN))
        h.run(h.into, f6(peer, pod, 8080, 46001, 500, l7t.SYN | l7t.ACK))
        h.run(h.out, f6(pod, peer, 46001, 8080, 11, l7t.ACK))
        h.run(h.out, f6(pod, peer, 46001, 8080, 11, l7t.ACK | l7t.PSH, l7t.REQ))
        h.run(h.into, f6(peer, pod, 8080, 46001, 501, l7t.ACK))
        h.run(h.into, f6(peer, pod, 8080, 46001, 501, l7t.ACK | l7t.PSH, l7t.RESP))
        assert h.requests() == {(2, "GET", 200, 8080): 1}
    keys = [sorted(k for k in h.obj.map("http_stats").keys_raw()) for h in pair]
    assert keys[0] == keys[1], "the same series: addresses, ports, family from the handoff as from the headers"


def _request_with_ctx(h: l7t.Harness, prog: bpf.Program, port: int, ctx_of) -> None:
    """A handshake, then the request through prog with the __sk_buff ctx_of(frame) gives, then
    the response: the request counts only if the request's parse saw its payload."""
    c = l7t.Conv(h, port).handshake()
    data = c._client(l7t.ACK | l7t.PSH, l7t.REQ, c.cseq)
    retval, out, _ = prog.test_run(data, ctx=ctx_of(data))
    assert retval == l7t.TC_ACT_UNSPEC and out == data
    c.cseq += len(l7t.REQ)
    c.reply(l7t.RESP)


def _lie(data: bytes, **kw: int) -> bytes:
    """A well-formed handoff for this frame that says it has no payload and a RST."""
    args = dict(l4=34, payload_off=54, payload_len=0, family=4, flags=l7t.RST)
    args.update(kw)
    return handoff_ctx(len(data), **args)


def test_standalone_parser_never_reads_cb(pair: Tuple[Chained, l7t.Harness]) -> None:
    alone = pair[1]
    alone.reset()
    _request_with_ctx(alone, alone.out, 33001, _lie)
    assert alone.requests() == {(2, "GET", 200, 80): 1}


@pytest.mark.parametrize("stale", ["other-length", "bad-check-word", "no-magic"])
def test_chained_parser_ignores_a_handoff_not_made_for_this_skb(pair: Tuple[Chained, l7t.Harness], stale: str) -> None:
    chained = pair[0]
    chained.reset()
    l7_in = chained.obj.program("meshlens_l7_in")

    def ctx(data: bytes) -> bytes:
        c = bytearray(_lie(data))
        if stale == "other-length":
            c[48:52] = struct.pack("<I", MAGIC ^ (len(data) + 4))
        elif stale == "bad-check-word":
            c[64:68] = bytes(4)
        else:
            c[48:52] = bytes(4)
        return bytes(c)

    _request_with_ctx(chained, l7_in, 33002, ctx)
    assert chained.requests() == {(2, "GET", 200, 80): 1}


def test_chained_parser_takes_the_handoff_as_the_headers(pair: Tuple[Chained, l7t.Harness]) -> None:
    """White box: a valid handoff is what the chained parser goes by (it does not read the TCP
    header again): told "no payload", it parses no request."""
    chained = pair[0]
    chained.reset()
    l7_in = chained.obj.program("meshlens_l7_in")
    _request_with_ctx(chained, l7_in, 33003, lambda d: _lie(d, flags=l7t.ACK | l7t.PSH))
    assert chained.requests() == {}
    _request_with_ctx(chained, l7_in, 33004, lambda d: _lie(d, flags=l7t.ACK | l7t.PSH, payload_len=len(l7t.REQ)))
    assert chained.requests() == {(2, "GET", 200, 80): 1}
