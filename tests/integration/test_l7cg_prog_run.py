"""bpf/l7cg.bpf.c (the cgroup_skb entry of the packet L7 core) under BPF_PROG_TEST_RUN on
crafted packets: one exchange counts once, under the socket's cgroup; frames cut short at every
byte, lying lengths and garbage count no request; a DNS query is paired with its answer.
Root: loads a BPF object.

A cgroup_skb program sees the packet from its IP header (the test run strips the Ethernet
header it is given) and one socket's view: `meshlens_cg_eg` what the socket sent,
`meshlens_cg_in` what was delivered to it, the same orientation as the tc harness's
out/into, so the conversations of test_l7pkt_prog_run.py run unchanged. BPF_PROG_TEST_RUN's
socket is a dummy (not TCP), so the object is loaded with `test_netns` set: the netns it uses
for a TCP packet whose socket is not a TCP socket (0, i.e. not parsed, in the agent).
"""
from __future__ import annotations

import errno
import os
import random
from collections import Counter
from typing import Iterator

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.l7.structs import METHOD_NAMES, L7CgRodata, MlHttpKey, MlHttpVal
from tests.integration import test_l7pkt_prog_run as tcrun
from tests.integration.test_l7pkt_prog_run import ACK, PEER, POD, PSH, REQ, RESP, Conv, frame, role
from tests.integration.pods import cgroup2_mount

NETNS = tcrun.NETNS
CG_PASS = 1
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


def my_cgroup_id() -> int:
    with open("/proc/self/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    return os.stat(os.path.join(cgroup2_mount(), rel.lstrip("/"))).st_ino


class CgHarness(tcrun.Harness):
    def __init__(self, obj: bpf.BpfObject) -> None:
        self.obj = obj
        self.ncpu = tcrun.num_possible_cpus()
        self.out = obj.program("meshlens_cg_eg")   # the socket sent it
        self.into = obj.program("meshlens_cg_in")  # delivered to the socket

    def run(self, prog: bpf.Program, data: bytes) -> None:
        try:
            retval, _out, _ = prog.test_run(data)
        except bpf.BpfError as exc:
            assert exc.errno == errno.EINVAL and (len(data) <= 14 or (data[12:14] == b"\x08\x00" and len(data) < 34)), exc
            return
        assert retval == CG_PASS, "a cgroup_skb observer never drops"

    def requests(self) -> Counter:
        out: Counter = Counter()
        for k, v in self.obj.map("http_stats").items_raw():
            key, val = MlHttpKey.from_buffer_copy(k), MlHttpVal.from_buffer_copy(v)
            assert key.netns == NETNS and key.cgroup_id == my_cgroup_id()   # the socket's cgroup
            out[(key.role, METHOD_NAMES[key.method], key.status, key.server_port)] += val.count
        return out


@pytest.fixture(scope="module")
def harness() -> Iterator[CgHarness]:
    obj = bpf.BpfObject(bpf.object_path("l7cg"))
    obj.set_rodata({"test_netns": NETNS}, L7CgRodata)
    obj.load()
    try:
        yield CgHarness(obj)
    finally:
        obj.close()


@pytest.fixture
def h(harness: CgHarness) -> CgHarness:
    harness.reset()
    return harness


@pytest.fixture(scope="module")
def small_harness() -> Iterator[CgHarness]:
    obj = bpf.BpfObject(bpf.object_path("l7cg"))
    obj.set_rodata({"test_netns": NETNS, "scan_max": tcrun.SMALL_SCAN}, L7CgRodata)
    obj.load()
    try:
        yield CgHarness(obj)
    finally:
        obj.close()


@pytest.mark.parametrize("sock_is_client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize("n", [50, 64])
def test_pipelined_burst_beyond_one_runs_budget(small_harness: CgHarness, sock_is_client: bool, n: int) -> None:
    """The same super-packets through the cgroup entry's tail calls (one program array per
    direction: egress and ingress continuations)."""
    small_harness.reset()
    tcrun.pipelined_burst(small_harness, sock_is_client, n)   # type: ignore[arg-type]


@pytest.mark.parametrize("sock_is_client", [True, False], ids=["client", "server"])
def test_a_connection_another_cpu_parses_is_waited_for(h: CgHarness, sock_is_client: bool) -> None:
    """The connection lock through the cgroup entry: a held lock leaves the segment counted
    as busy, a stale one is taken over, and every path lets go."""
    tcrun.test_a_connection_another_cpu_parses_is_waited_for_never_parsed_twice(h, sock_is_client)  # type: ignore[arg-type]


@pytest.mark.parametrize("sock_is_client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize("split", ["three segments", "one byte each"])
def test_a_path_split_over_segments_keeps_its_text(h: CgHarness, sock_is_client: bool, split: str) -> None:
    tcrun.test_a_path_split_over_segments_keeps_its_text(h, sock_is_client, split)  # type: ignore[arg-type]


@pytest.mark.parametrize("sock_is_client", [True, False], ids=["client", "server"])
def test_one_exchange_counts_once(h: CgHarness, sock_is_client: bool) -> None:
    c = Conv(h, 40001, sock_is_client).handshake()   # type: ignore[arg-type]
    c.send(REQ)
    c.reply(RESP)
    c.send(REQ)          # keep-alive: a second exchange
    c.reply(RESP)
    c.close()
    assert h.requests() == {(role(sock_is_client), "GET", 200, 80): 2}
    assert h.body_sums() == (0, 6)
    assert not list(h.obj.map("pkt_conns").keys_raw()), "FIN both ways forgets the connection"


def test_frames_cut_short_at_every_byte_count_nothing(h: CgHarness) -> None:
    before = h.counters()
    full = frame(POD, PEER, 41000, 80, 1001, ACK | PSH, REQ)
    for n in range(len(full)):
        port = 41000 + n
        c = Conv(h, port).handshake()   # type: ignore[arg-type]
        h.run(h.out, frame(POD, PEER, port, 80, c.cseq, ACK | PSH, REQ)[:n])
        c.reply(RESP)
    assert h.requests() == {}
    assert h.counters()["pkt_unparsed"] - before["pkt_unparsed"] == len(full) - 34


@pytest.mark.parametrize("kind", ["tot_len_short", "tot_len_long", "doff_short"])
def test_lying_lengths_count_nothing(h: CgHarness, kind: str) -> None:
    c = Conv(h, 42000).handshake()   # type: ignore[arg-type]
    tot = {"tot_len_short": 12, "tot_len_long": 20 + 20 + len(REQ) + 200}.get(kind)
    data = frame(POD, PEER, 42000, 80, c.cseq, ACK | PSH, REQ, tot_len=tot, doff=3 if kind == "doff_short" else 5)
    before = h.counters()
    h.run(h.out, data)
    c.reply(RESP)
    assert h.requests() == {}
    assert h.counters()["pkt_unparsed"] - before["pkt_unparsed"] == 1


@pytest.mark.parametrize("seed", range(4))
def test_garbage_counts_nothing(h: CgHarness, seed: int) -> None:
    rng = random.Random(seed)
    c = Conv(h, 43000 + seed, pod_is_client=bool(seed % 2)).handshake()   # type: ignore[arg-type]
    c.reply(RESP)                                       # a response nobody asked for
    for _ in range(20):
        c.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        c.reply(RESP)
    # not even IP: a version nibble of neither 4 nor 6 after the Ethernet header
    for _ in range(20):
        h.run(h.out, frame(POD, PEER, 1, 80, 1, ACK)[:14] + bytes(rng.randrange(256) for _ in range(60)))
    assert h.requests() == {}


@pytest.fixture(scope="module")
def hdns() -> Iterator[CgHarness]:
    """The DNS harness: a query's netns is the sending task's (this test's), and since every
    test run has a fresh dummy socket, the answer's is test_netns: the same netns here."""
    obj = bpf.BpfObject(bpf.object_path("l7cg"))
    obj.set_rodata({"test_netns": HOST_NETNS}, L7CgRodata)
    obj.load()
    try:
        yield CgHarness(obj)
    finally:
        obj.close()


def test_dns_udp_paired_once(hdns: CgHarness) -> None:
    h = hdns
    tcrun.dns_answers(h)   # type: ignore[arg-type]
    c0 = h.counters()
    q = tcrun.dns_msg(0x4321, "web.meshlens.test", 1)
    h.run(h.out, tcrun.udp(POD, PEER, 40001, 53, q))
    h.run(h.into, tcrun.udp(PEER, POD, 53, 40001, tcrun.dns_msg(0x4321, "other.test", 1, True)))   # wrong question
    h.run(h.into, tcrun.udp(PEER, POD, 53, 40001, tcrun.dns_msg(0x4321, "web.meshlens.test", 1, True, 3)))
    h.run(h.into, tcrun.udp(PEER, POD, 53, 40001, tcrun.dns_msg(0x4321, "web.meshlens.test", 1, True, 3)))  # again
    c1 = h.counters()
    d = {n: c1[n] - c0[n] for n in ("dns_queries", "dns_unmatched", "dns_events")}
    assert d == {"dns_queries": 1, "dns_unmatched": 2, "dns_events": 1}
    ev = tcrun.dns_answers(h)   # type: ignore[arg-type]
    assert len(ev) == 1 and ev[0].netns == HOST_NETNS and ev[0].cgroup_id == my_cgroup_id()


@tcrun.IPV6_EXTS
def test_ipv6_extension_headers_skipped(h: CgHarness, exts) -> None:
    """cgroup_skb sees the packet from its IPv6 header: the same extension headers skipped."""
    tcrun.ipv6_ext_exchange(h, exts)   # type: ignore[arg-type]
    assert h.requests() == {(2, "GET", 200, 8080): 1}
