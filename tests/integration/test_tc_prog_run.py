"""bpf/tc.bpf.c under BPF_PROG_TEST_RUN on crafted frames (Cilium's way of testing tc
programs): IPv4, IPv6 with extension headers, VLAN and QinQ, first and later fragments,
frames truncated at every byte, zero-length and random garbage. For every case the
per-interface counters and the parse-failure counters move exactly as expected, the
program returns TC_ACT_UNSPEC and leaves the frame untouched. Root: loads a BPF object.

BPF_PROG_TEST_RUN runs a sched_cls program on an skb whose device is loopback (ifindex 1),
so every case is counted under ifindex 1.
"""
from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.libbpf import num_possible_cpus
from meshlens.agent.sources.tc.structs import (
    COUNTER_NAMES,
    EGRESS,
    INGRESS,
    PARSE_FAILURE_REASONS,
    ROLE_CLIENT,
    ROLE_SERVER,
    TcIfStats,
    TcRttHist,
    TcRttKey,
    format_addr,
    percpu_values,
    sum_structs,
)
from tests.integration import tc_packets as pk

TC_ACT_UNSPEC = 0xFFFFFFFF
LO = 1
STAT_FIELDS = ("packets", "bytes", "segs", "tcp_syn", "tcp_synack", "tcp_fin", "tcp_rst", "parse_failures")


@dataclass
class Delta:
    stats: Dict[int, Dict[str, int]]   # direction -> field -> delta
    counters: Dict[str, int]           # counter name -> delta (non-zero only)


class Harness:
    def __init__(self, obj: bpf.BpfObject) -> None:
        self.obj = obj
        self.ncpu = num_possible_cpus()
        self.progs = {INGRESS: obj.program("meshlens_tc_in"), EGRESS: obj.program("meshlens_tc_eg")}

    def _stats(self) -> Dict[int, Dict[str, int]]:
        out = {INGRESS: dict.fromkeys(STAT_FIELDS, 0), EGRESS: dict.fromkeys(STAT_FIELDS, 0)}
        for k, v in self.obj.map("ifstats").items_raw():
            ifindex, direction = int.from_bytes(k[:4], "little"), int.from_bytes(k[4:8], "little")
            if ifindex != LO:
                continue
            s = sum_structs(percpu_values(v, TcIfStats, self.ncpu), TcIfStats)
            out[direction] = {f: getattr(s, f) for f in STAT_FIELDS}
        return out

    def _counters(self) -> Dict[str, int]:
        sums = self.obj.map("counters").percpu_u64_sums()
        return {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}

    def run(self, data: bytes, direction: int = INGRESS) -> Delta:
        s0, c0 = self._stats(), self._counters()
        retval, out, _ = self.progs[direction].test_run(data)
        assert retval == TC_ACT_UNSPEC
        assert out == data, "the program must not modify the frame"
        s1, c1 = self._stats(), self._counters()
        stats = {d: {f: s1[d][f] - s0[d][f] for f in STAT_FIELDS} for d in (INGRESS, EGRESS)}
        counters = {n: c1[n] - c0[n] for n in COUNTER_NAMES if c1[n] != c0[n]}
        return Delta(stats, counters)

    def rtt(self) -> Dict[Tuple[int, str, int], TcRttHist]:
        out = {}
        for k, v in self.obj.map("rtt").items_raw():
            key = TcRttKey.from_buffer_copy(k)
            out[(key.role, format_addr(key.family, key.peer), key.ifindex)] = sum_structs(
                percpu_values(v, TcRttHist, self.ncpu), TcRttHist)
        return out

    def syns(self) -> int:
        return len(self.obj.map("syns").items_raw())

    def clear_handshakes(self) -> None:
        for name in ("syns", "rtt"):
            m = self.obj.map(name)
            for k in list(m.keys_raw()):
                m.delete_raw(k)


def _load(**sizes: int) -> bpf.BpfObject:
    obj = bpf.BpfObject(bpf.object_path("tc"))
    obj.program("handle_tc_kfree_skb").autoload = False  # not needed: no attach here
    for name, n in sizes.items():
        obj.map(name).max_entries = n
    obj.load()
    return obj


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    obj = _load()
    try:
        yield Harness(obj)
    finally:
        obj.close()


def expect(d: Delta, direction: int = INGRESS, counters: Dict[str, int] | None = None, **fields: int) -> None:
    """Exactly these stats fields moved (packets=1 and the frame's bytes implied by caller)."""
    want = dict.fromkeys(STAT_FIELDS, 0)
    want.update(fields)
    assert d.stats[direction] == want
    other = EGRESS if direction == INGRESS else INGRESS
    assert all(v == 0 for v in d.stats[other].values())
    want_c = {"packets": 1, **(counters or {})}
    assert d.counters == want_c


def ok(frame: pk.Frame, **flags: int) -> Dict[str, int]:
    return dict(packets=1, bytes=len(frame), segs=1, **flags)


# --------------------------------------------------------------------------- well-formed frames

@pytest.mark.parametrize("flags,field", [
    (pk.SYN, "tcp_syn"), (pk.SYN | pk.ACK, "tcp_synack"), (pk.FIN | pk.ACK, "tcp_fin"),
    (pk.RST, "tcp_rst"), (pk.RST | pk.ACK, "tcp_rst"),
])
@pytest.mark.parametrize("direction", [INGRESS, EGRESS])
def test_ipv4_tcp_flags(h: Harness, flags: int, field: str, direction: int) -> None:
    f = pk.tcp4(flags=flags, sport=41000 + flags, dport=7000 + direction)
    d = h.run(f.data, direction)
    extra = {"synack_unmatched": 1} if flags == pk.SYN | pk.ACK else {}
    expect(d, direction, extra, **ok(f, **{field: 1}))
    h.clear_handshakes()


def test_ipv4_ack_with_payload_counts_no_flags(h: Harness) -> None:
    f = pk.tcp4(flags=pk.ACK | pk.PSH, payload=b"x" * 1000)
    expect(h.run(f.data), **ok(f))


def test_ipv4_udp(h: Harness) -> None:
    f = pk.udp4(100)
    assert len(f) == 100 + 8 + 20 + 14
    expect(h.run(f.data), **ok(f))


def test_ipv4_options_and_tcp_options(h: Harness) -> None:
    f = pk.tcp4(flags=pk.FIN | pk.ACK, ip_options=b"\x01" * 12, tcp_options=b"\x02\x04\x05\xb4" + b"\x01" * 8)
    expect(h.run(f.data), **ok(f, tcp_fin=1))


def test_arp_is_non_ip_not_a_failure(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_ARP) + b"\x00" * 28
    d = h.run(data)
    expect(d, counters={"non_ip": 1}, packets=1, bytes=len(data), segs=1)


def test_ipv4_first_fragment_has_l4(h: Harness) -> None:
    f = pk.tcp4(flags=pk.RST, more_fragments=True)
    expect(h.run(f.data), **ok(f, tcp_rst=1))


def test_ipv4_later_fragment_is_not_parsed_as_tcp(h: Harness) -> None:
    # The payload of a later fragment happens to look like a TCP header with SYN set.
    eth = pk.ethernet(pk.ETH_P_IP)
    fake_tcp = pk.tcp_header(1, 2, pk.SYN)
    data = eth + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(fake_tcp), frag_offset=185) + fake_tcp
    expect(h.run(data), counters={"fragments": 1}, packets=1, bytes=len(data), segs=1)


def test_ipv6_tcp_syn(h: Harness) -> None:
    f = pk.tcp6(flags=pk.SYN, sport=42001)
    expect(h.run(f.data), **ok(f, tcp_syn=1))
    h.clear_handshakes()


def test_ipv6_extension_chain(h: Harness) -> None:
    exts = [(pk.HOP, {"length_units": 0}), (pk.DSTOPTS, {"length_units": 2}), (pk.ROUTING, {"length_units": 1}),
            (pk.FRAGMENT, {"frag_offset": 0, "more": True}), (pk.AH, {"length_units": 4})]
    f = pk.tcp6(flags=pk.FIN | pk.ACK, exts=exts)
    expect(h.run(f.data), **ok(f, tcp_fin=1))


def test_ipv6_eight_extension_headers_is_the_limit(h: Harness) -> None:
    f = pk.tcp6(flags=pk.RST, exts=[(pk.DSTOPTS, {})] * 8)
    expect(h.run(f.data), **ok(f, tcp_rst=1))


def test_ipv6_nine_extension_headers_is_counted(h: Harness) -> None:
    f = pk.tcp6(flags=pk.RST, exts=[(pk.DSTOPTS, {})] * 9)
    expect(h.run(f.data), counters={"ipv6_ext_too_deep": 1}, packets=1, bytes=len(f), segs=1, parse_failures=1)


def test_ipv6_later_fragment(h: Harness) -> None:
    f = pk.tcp6(flags=pk.SYN, exts=[(pk.FRAGMENT, {"frag_offset": 100})])
    expect(h.run(f.data), counters={"fragments": 1}, packets=1, bytes=len(f), segs=1)


def test_ipv6_esp_has_no_readable_l4(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_IPV6) + pk.ipv6_header("fd00::1", "fd00::2", pk.ESP, 40) + b"\xee" * 40
    expect(h.run(data), counters={"ipv6_no_l4": 1}, packets=1, bytes=len(data), segs=1)


@pytest.mark.parametrize("vlans", [
    [(pk.ETH_P_8021Q, 100)],
    [(pk.ETH_P_8021AD, 10), (pk.ETH_P_8021Q, 20)],   # QinQ
    [(pk.ETH_P_8021Q, 10), (pk.ETH_P_8021Q, 20)],    # double 802.1Q
])
@pytest.mark.parametrize("family", [4, 6])
def test_vlan_and_qinq(h: Harness, vlans, family: int) -> None:
    f = (pk.tcp4 if family == 4 else pk.tcp6)(flags=pk.FIN, vlans=vlans)
    expect(h.run(f.data), **ok(f, tcp_fin=1))


def test_three_vlan_tags_is_counted(h: Harness) -> None:
    f = pk.tcp4(flags=pk.FIN, vlans=[(pk.ETH_P_8021AD, 1), (pk.ETH_P_8021Q, 2), (pk.ETH_P_8021Q, 3)])
    expect(h.run(f.data), counters={"vlan_too_deep": 1}, packets=1, bytes=len(f), segs=1, parse_failures=1)


# --------------------------------------------------------------------------- malformed headers

def test_ipv4_header_length_below_minimum(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, 20, ihl=4) + pk.tcp_header(1, 2, pk.SYN)
    expect(h.run(data), counters={"bad_ipv4": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_ipv4_wrong_version(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, 20, version=6) + pk.tcp_header(1, 2, pk.SYN)
    expect(h.run(data), counters={"bad_ipv4": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_ipv6_wrong_version(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_IPV6) + pk.ipv6_header("fd00::1", "fd00::2", pk.TCP, 20, version=4) + pk.tcp_header(1, 2, pk.SYN)
    expect(h.run(data), counters={"bad_ipv6": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_tcp_data_offset_below_minimum(h: Harness) -> None:
    th = pk.tcp_header(1, 2, pk.SYN, doff=4)
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(th)) + th
    expect(h.run(data), counters={"bad_tcp": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_tcp_options_cut_off(h: Harness) -> None:
    th = pk.tcp_header(1, 2, pk.SYN, doff=15)  # claims 60 bytes, has 20
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, len(th)) + th
    expect(h.run(data), counters={"short_tcp": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_ethernet_padding_is_not_read_as_tcp(h: Harness) -> None:
    # tot_len says the IP packet is its 20-byte header; the frame's padding looks like a SYN.
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, 0) + pk.tcp_header(1, 2, pk.SYN)
    expect(h.run(data), counters={"short_tcp": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


def test_ipv4_total_length_below_header(h: Harness) -> None:
    data = pk.ethernet(pk.ETH_P_IP) + pk.ipv4_header("10.0.0.1", "10.0.0.2", pk.TCP, 20, tot_len=10) + pk.tcp_header(1, 2, pk.SYN)
    expect(h.run(data), counters={"bad_ipv4": 1}, packets=1, bytes=len(data), segs=1, parse_failures=1)


# --------------------------------------------------------------------------- truncation at every byte

TRUNCATION_REASON = {"vlan": "short_vlan", "ipv4": "short_ipv4", "ipv6": "short_ipv6",
                     "ipv6_ext": "short_ipv6_ext", "tcp": "short_tcp"}


def _truncation_cases() -> Iterator[Tuple[str, pk.Frame]]:
    yield "qinq-ipv4-options-tcp-options", pk.tcp4(
        flags=pk.SYN, vlans=[(pk.ETH_P_8021AD, 5), (pk.ETH_P_8021Q, 6)],
        ip_options=b"\x01" * 8, tcp_options=b"\x02\x04\x05\xb4")
    yield "vlan-ipv6-exts-tcp", pk.tcp6(
        flags=pk.SYN, vlans=[(pk.ETH_P_8021Q, 7)],
        exts=[(pk.HOP, {}), (pk.ROUTING, {"length_units": 2}), (pk.FRAGMENT, {}), (pk.AH, {"length_units": 2})])


@pytest.mark.parametrize("name,frame", list(_truncation_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_truncated_at_every_byte(h: Harness, name: str, frame: pk.Frame) -> None:
    """Every cut between the Ethernet header and the end of the TCP header is a parse
    failure of the layer it falls in; the full frame parses (the SYN is counted)."""
    tcp_end = dict(frame.layers)["payload"]
    for cut in range(14, tcp_end):
        data = frame.data[:cut]
        d = h.run(data)
        reason = TRUNCATION_REASON[frame.layer_at(cut)]
        assert d.counters == {"packets": 1, reason: 1}, f"cut at {cut} ({frame.layer_at(cut)})"
        assert d.stats[INGRESS] == dict(packets=1, bytes=cut, segs=1, tcp_syn=0, tcp_synack=0, tcp_fin=0,
                                        tcp_rst=0, parse_failures=1)
    d = h.run(frame.data)
    assert d.counters == {"packets": 1}
    assert d.stats[INGRESS]["tcp_syn"] == 1
    h.clear_handshakes()


@pytest.mark.parametrize("size", [0, 1, 13])
def test_frames_shorter_than_ethernet_are_refused_by_the_kernel(h: Harness, size: int) -> None:
    """BPF_PROG_TEST_RUN itself refuses sched_cls input shorter than ETH_HLEN: such a frame
    never reaches the program (counters do not move)."""
    before = h._counters()
    with pytest.raises(bpf.BpfError) as exc:
        h.progs[INGRESS].test_run(b"\x00" * size)
    assert exc.value.errno == errno.EINVAL
    assert h._counters() == before


def test_ethernet_header_only(h: Harness) -> None:
    """Headers end right after Ethernet (or after a tag). Untagged IPv4/IPv6 frames shorter
    than the fixed IP header are refused by BPF_PROG_TEST_RUN itself (see below), so the
    IP cases go behind a VLAN tag, where the kernel does not look."""
    q = [(pk.ETH_P_8021Q, 9)]
    for data, reason in ((pk.ethernet(pk.ETH_P_IP, q), "short_ipv4"), (pk.ethernet(pk.ETH_P_IPV6, q), "short_ipv6"),
                         (pk.ethernet(pk.ETH_P_8021Q), "short_vlan"), (pk.ethernet(pk.ETH_P_ARP), "non_ip")):
        d = h.run(data)
        assert d.counters == {"packets": 1, reason: 1}


@pytest.mark.parametrize("ethertype,minimum", [(pk.ETH_P_IP, 14 + 20), (pk.ETH_P_IPV6, 14 + 40)])
def test_untagged_short_ip_frames_are_refused_by_test_run(h: Harness, ethertype: int, minimum: int) -> None:
    before = h._counters()
    for size in range(14, minimum):
        with pytest.raises(bpf.BpfError):
            h.progs[INGRESS].test_run(pk.ethernet(ethertype) + b"\x45" * (size - 14))
    assert h._counters() == before


def test_untagged_ipv4_truncated_in_tcp(h: Harness) -> None:
    f = pk.tcp4(flags=pk.SYN, tcp_options=b"\x02\x04\x05\xb4")
    for cut in range(dict(f.layers)["tcp"], dict(f.layers)["payload"]):
        assert h.run(f.data[:cut]).counters == {"packets": 1, "short_tcp": 1}


# --------------------------------------------------------------------------- garbage

def test_random_garbage_never_faults_and_is_accounted(h: Harness) -> None:
    """2000 random frames (half with a plausible ethertype so deeper parsers run): the
    program always returns UNSPEC; every frame is counted once; parse failures in the
    per-interface stats equal the sum of the failure reasons."""
    rng = random.Random(20261127)
    s0, c0 = h._stats(), h._counters()
    total_bytes = refused = 0
    n = 2000
    for i in range(n):
        size = rng.randrange(14, 400)
        body = bytearray(rng.randbytes(size))
        if i % 2:
            body[12:14] = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8"])
            if body[12:14] == b"\x08\x00" and size > 14:
                body[14] = 0x40 | rng.randrange(5, 16)  # make IPv4 plausible more often
            if body[12:14] == b"\x86\xdd" and size > 14:
                body[14] = 0x60 | (body[14] & 0x0F)
        try:
            retval, out, _ = h.progs[i % 2].test_run(bytes(body))
        except bpf.BpfError as exc:  # the kernel refuses untagged IP frames shorter than the IP header
            assert exc.errno == errno.EINVAL
            assert (bytes(body[12:14]), size < 34) in ((b"\x08\x00", True),) or (bytes(body[12:14]) == b"\x86\xdd" and size < 54)
            refused += 1
            continue
        total_bytes += size
        assert retval == TC_ACT_UNSPEC and out == bytes(body)
    s1, c1 = h._stats(), h._counters()
    packets = sum(s1[d]["packets"] - s0[d]["packets"] for d in (INGRESS, EGRESS))
    nbytes = sum(s1[d]["bytes"] - s0[d]["bytes"] for d in (INGRESS, EGRESS))
    failures = sum(s1[d]["parse_failures"] - s0[d]["parse_failures"] for d in (INGRESS, EGRESS))
    by_reason = sum(c1[r] - c0[r] for r in PARSE_FAILURE_REASONS)
    assert refused < n // 10
    assert packets == n - refused and c1["packets"] - c0["packets"] == n - refused
    assert nbytes == total_bytes
    assert failures == by_reason > 0
    h.clear_handshakes()


# --------------------------------------------------------------------------- handshake RTT

def test_handshake_rtt_pod_as_client(h: Harness) -> None:
    h.clear_handshakes()
    syn = pk.tcp4("10.1.0.5", "10.1.0.9", 45000, 443, pk.SYN)
    synack = pk.tcp4("10.1.0.9", "10.1.0.5", 443, 45000, pk.SYN | pk.ACK)
    h.run(syn.data, INGRESS)          # the pod sent the SYN
    assert h.syns() == 1
    d = h.run(synack.data, EGRESS)    # the SYN-ACK is delivered to the pod
    assert d.counters == {"packets": 1}
    assert h.syns() == 0
    rtt = h.rtt()
    assert list(rtt) == [(ROLE_CLIENT, "10.1.0.9", LO)]
    hist = rtt[(ROLE_CLIENT, "10.1.0.9", LO)]
    assert hist.count == 1 and sum(hist.slots) == 1 and 0 < hist.sum_ns < 10**9


def test_handshake_rtt_pod_as_server_ipv6(h: Harness) -> None:
    h.clear_handshakes()
    h.run(pk.tcp6("fd00::7", "fd00::3", 50000, 8080, pk.SYN).data, EGRESS)
    h.run(pk.tcp6("fd00::3", "fd00::7", 8080, 50000, pk.SYN | pk.ACK).data, INGRESS)
    assert list(h.rtt()) == [(ROLE_SERVER, "fd00::7", LO)]


def test_synack_in_the_same_direction_does_not_match(h: Harness) -> None:
    h.clear_handshakes()
    h.run(pk.tcp4("10.1.0.5", "10.1.0.9", 45001, 443, pk.SYN).data, INGRESS)
    d = h.run(pk.tcp4("10.1.0.9", "10.1.0.5", 443, 45001, pk.SYN | pk.ACK).data, INGRESS)
    assert d.counters == {"packets": 1, "synack_unmatched": 1}
    assert h.rtt() == {} and h.syns() == 1
    h.clear_handshakes()


def test_syn_retransmit_and_reset(h: Harness) -> None:
    h.clear_handshakes()
    syn = pk.tcp4("10.1.0.5", "10.1.0.9", 45002, 81, pk.SYN)
    h.run(syn.data, INGRESS)
    assert h.run(syn.data, INGRESS).counters == {"packets": 1, "syn_retransmits": 1}
    d = h.run(pk.tcp4("10.1.0.9", "10.1.0.5", 81, 45002, pk.RST | pk.ACK).data, EGRESS)
    assert d.counters == {"packets": 1, "syn_reset": 1}
    assert h.syns() == 0 and h.rtt() == {}


def test_full_maps_are_counted_not_evicted() -> None:
    obj = _load(syns=2, rtt=1)
    try:
        hh = Harness(obj)
        for port in (1, 2, 3):
            hh.run(pk.tcp4("10.2.0.1", "10.2.0.2", 40000 + port, 80, pk.SYN).data, INGRESS)
        assert hh._counters()["syns_full"] == 1
        assert hh.syns() == 2  # the first two stay: nothing was evicted
        # Two answered handshakes to two different peers: the rtt map holds one.
        hh.clear_handshakes()
        for peer in ("10.2.0.3", "10.2.0.4"):
            hh.run(pk.tcp4("10.2.0.1", peer, 40010, 80, pk.SYN).data, INGRESS)
            hh.run(pk.tcp4(peer, "10.2.0.1", 80, 40010, pk.SYN | pk.ACK).data, EGRESS)
        assert hh._counters()["rtt_full"] == 1
        assert [k[1] for k in hh.rtt()] == ["10.2.0.3"]
    finally:
        obj.close()


def test_unanswered_syns_are_expired_by_the_sweep(h: Harness) -> None:
    """The `syns` map is a plain hash: SYNs that never get an answer are deleted (and
    counted) by the agent's sweep after syn_timeout_s, not evicted by the kernel."""
    from meshlens.agent.kernel.features import KernelFeatures
    from meshlens.agent.sources.tc.source import TcConfig, TcSource

    h.clear_handshakes()
    h.run(pk.tcp4("10.3.0.1", "10.3.0.2", 40100, 80, pk.SYN).data, INGRESS)
    src = TcSource(TcConfig(syn_timeout_s=3600), KernelFeatures.probe(), watch=False)
    src.obj = h.obj
    try:
        src.sweep(0)
        assert h.syns() == 1 and src.syns_expired == 0
        src.config = TcConfig(syn_timeout_s=0.0)
        src.sweep(0)
        assert h.syns() == 0 and src.syns_expired == 1
        assert src.snapshot().syns_expired == 1
    finally:
        src.obj = None  # the module fixture owns the object
