"""bpf/l7pkt.bpf.c under BPF_PROG_TEST_RUN on crafted TCP conversations: retransmitted and
overlapping segments, gaps in headers and in bodies, pipelined messages in one frame, frames
cut short at every byte, lying lengths and garbage. The rule checked everywhere: a request is
counted only when it was sent whole and answered, and never twice. Root: loads a BPF object.

BPF_PROG_TEST_RUN runs a sched_cls program on an skb whose device is loopback (ifindex 1), so
the harness registers ifindex 1 as a pod interface (pkt_ifaces) with a made-up netns inode.
`meshlens_l7_in` sees what the pod sent, `meshlens_l7_eg` what was delivered to it.
"""
from __future__ import annotations

import errno
import ipaddress
import random
import struct
import time
from collections import Counter
from typing import Dict, Iterator, Sequence, Tuple

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.libbpf import num_possible_cpus
from meshlens.agent.sources.l7.structs import (COUNTER_NAMES, DNS_ANSWERED, EV_DNS, EV_PATH, METHOD_NAMES,
                                               L7PktRodata, MlDnsEvent, MlHttpKey, MlHttpVal, MlPathEvent, MlPktIface)
from tests.integration import tc_packets as pk

TC_ACT_UNSPEC = 0xFFFFFFFF
LO = 1
NETNS = 4242
POD, PEER = "10.9.0.2", "10.9.0.1"
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


class Harness:
    def __init__(self, obj: bpf.BpfObject) -> None:
        self.obj = obj
        self.ncpu = num_possible_cpus()
        self.out = obj.program("meshlens_l7_in")   # the pod sent it
        self.into = obj.program("meshlens_l7_eg")  # delivered to the pod
        obj.map("pkt_ifaces").update_raw(LO.to_bytes(4, "little"), bytes(MlPktIface(NETNS, 0)))

    def run(self, prog: bpf.Program, data: bytes) -> None:
        try:
            retval, out, _ = prog.test_run(data)
        except bpf.BpfError as exc:
            # the kernel refuses frames shorter than Ethernet, and IPv4 frames shorter than the IP header
            assert exc.errno == errno.EINVAL and (len(data) <= 14 or (data[12:14] == b"\x08\x00" and len(data) < 34)), exc
            return
        assert retval == TC_ACT_UNSPEC
        assert out == data, "the program must not modify the frame"

    def requests(self) -> Counter:
        """(role, method, status, server port) -> requests counted."""
        out: Counter = Counter()
        for k, v in self.obj.map("http_stats").items_raw():
            key, val = MlHttpKey.from_buffer_copy(k), MlHttpVal.from_buffer_copy(v)
            assert key.netns == NETNS and key.cgroup_id == 0
            out[(key.role, METHOD_NAMES[key.method], key.status, key.server_port)] += val.count
        return out

    def counters(self) -> Dict[str, int]:
        sums = self.obj.map("l7_counters").percpu_u64_sums()
        return {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}

    def body_sums(self) -> Tuple[int, int]:
        req = resp = 0
        for _k, v in self.obj.map("http_stats").items_raw():
            val = MlHttpVal.from_buffer_copy(v)
            req += val.req_body_sum
            resp += val.resp_body_sum
        return req, resp

    def locks_held(self) -> int:
        """Connection entries whose lock word (struct pconn's last field) is taken."""
        return sum(1 for _k, v in self.obj.map("pkt_conns").items_raw() if v[-4:] != bytes(4))

    def set_lock(self, word: int) -> None:
        """Write the lock word of the one connection entry, as another CPU holding it would."""
        m = self.obj.map("pkt_conns")
        (k, v), = m.items_raw()
        m.update_raw(k, v[:-4] + struct.pack("<I", word))

    def reset(self) -> None:
        for name in ("http_stats", "pkt_conns", "dns_pending"):
            m = self.obj.map(name)
            for k in list(m.keys_raw()):
                m.delete_raw(k)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    obj = bpf.BpfObject(bpf.object_path("l7pkt"))
    obj.load()
    try:
        yield Harness(obj)
    finally:
        obj.close()


@pytest.fixture
def h(harness: Harness) -> Harness:
    harness.reset()
    return harness


def frame(src: str, dst: str, sport: int, dport: int, seq: int, flags: int, payload: bytes = b"",
          tot_len: int | None = None, doff: int = 5, options: bool = True) -> bytes:
    th = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 1, doff << 4, flags, 65535, 0, 0)
    if options:  # else the data offset is a lie
        th += b"\x01" * max(0, doff * 4 - 20)
    ip = pk.ipv4_header(src, dst, 6, len(th) + len(payload), tot_len=tot_len)
    return pk.ethernet(0x0800) + ip + th + payload


class Conv:
    """One TCP connection between the pod and a peer; the pod is the client or the server."""

    def __init__(self, h: Harness, port: int, pod_is_client: bool = True) -> None:
        self.h, self.pod_is_client = h, pod_is_client
        self.pod_port, self.peer_port = (port, 80) if pod_is_client else (80, port)
        self.cseq, self.sseq = 1000, 900000

    def _client(self, flags: int, payload: bytes, seq: int) -> bytes:
        if self.pod_is_client:
            return frame(POD, PEER, self.pod_port, self.peer_port, seq, flags, payload)
        return frame(PEER, POD, self.peer_port, self.pod_port, seq, flags, payload)

    def _server(self, flags: int, payload: bytes, seq: int) -> bytes:
        if self.pod_is_client:
            return frame(PEER, POD, self.peer_port, self.pod_port, seq, flags, payload)
        return frame(POD, PEER, self.pod_port, self.peer_port, seq, flags, payload)

    def _progs(self):
        # (program for client->server frames, program for server->client frames)
        return (self.h.out, self.h.into) if self.pod_is_client else (self.h.into, self.h.out)

    def handshake(self) -> "Conv":
        c, s = self._progs()
        self.h.run(c, self._client(SYN, b"", self.cseq))
        self.cseq += 1
        self.h.run(s, self._server(SYN | ACK, b"", self.sseq))
        self.sseq += 1
        return self

    def send(self, payload: bytes, seq: int | None = None, advance: bool = True) -> None:
        """Client -> server bytes at seq (default: the next expected)."""
        seq = self.cseq if seq is None else seq
        self.h.run(self._progs()[0], self._client(ACK | PSH, payload, seq))
        if advance:
            self.cseq = max(self.cseq, seq + len(payload))

    def reply(self, payload: bytes, seq: int | None = None, advance: bool = True) -> None:
        seq = self.sseq if seq is None else seq
        self.h.run(self._progs()[1], self._server(ACK | PSH, payload, seq))
        if advance:
            self.sseq = max(self.sseq, seq + len(payload))

    def close(self) -> None:
        c, s = self._progs()
        self.h.run(c, self._client(FIN | ACK, b"", self.cseq))
        self.h.run(s, self._server(FIN | ACK, b"", self.sseq))


REQ = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
ROLES = pytest.mark.parametrize("pod_is_client", [True, False], ids=["client", "server"])


def role(pod_is_client: bool) -> int:
    return 2 if pod_is_client else 1


@ROLES
def test_one_exchange_counts_once(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40001, pod_is_client).handshake()
    c.send(REQ)
    c.reply(RESP)
    c.close()
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1}
    assert h.body_sums() == (0, 3)
    assert not list(h.obj.map("pkt_conns").keys_raw()), "FIN both ways forgets the connection"


@ROLES
def test_retransmits_are_skipped(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40002, pod_is_client).handshake()
    before = h.counters()
    seq = c.cseq
    c.send(REQ)
    c.send(REQ, seq=seq)               # the same segment again (retransmit / seen twice)
    rseq = c.sseq
    c.reply(RESP)
    c.reply(RESP, seq=rseq)
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1}
    assert h.counters()["pkt_retransmits"] - before["pkt_retransmits"] == 2


@ROLES
def test_partial_overlap_skips_the_old_prefix(h: Harness, pod_is_client: bool) -> None:
    """A retransmit that re-sends a whole request plus new bytes: only the new one counts."""
    c = Conv(h, 40003, pod_is_client).handshake()
    before = h.counters()
    seq = c.cseq
    c.send(REQ)
    post = b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nGET "
    c.send(REQ + post, seq=seq)        # overlaps all of REQ
    c.reply(RESP + b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1, (role(pod_is_client), "POST", 201, 80): 1}
    assert h.counters()["pkt_overlaps"] - before["pkt_overlaps"] == 1
    assert h.body_sums() == (4, 3)


@ROLES
def test_gap_in_headers_desyncs_and_never_guesses(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40004, pod_is_client).handshake()
    before = h.counters()
    c.send(REQ)
    # a segment is missing: the next one seen starts inside a request's headers
    lost = b"GET /lost HTTP/1.1\r\nH"
    c.send(b"ost: x\r\n\r\n", seq=c.cseq + len(lost))
    c.reply(RESP)                       # answers /a, but its pairing can no longer be trusted
    c.reply(RESP)                       # answers /lost
    c.send(b"PUT /c HTTP/1.1\r\nContent-Length: 2\r\n\r\nzz")   # starts a segment: resync
    c.reply(b"HTTP/1.1 204 No Content\r\n\r\n")
    k = h.counters()
    assert h.requests() == {(role(pod_is_client), "PUT", 204, 80): 1}
    assert k["pkt_desync"] - before["pkt_desync"] == 1
    assert k["pkt_resync"] - before["pkt_resync"] >= 1
    assert k["unpaired_response"] - before["unpaired_response"] >= 1


@ROLES
def test_gap_inside_a_body_is_skipped_by_arithmetic(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40005, pod_is_client).handshake()
    before = h.counters()
    c.send(REQ)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n"
    start = c.sseq
    c.reply(head + b"x" * 1000)
    hole = c.sseq
    c.reply(b"y" * 1000, seq=hole + 1000)            # arrives before the hole is filled
    c.reply(b"w" * 1000, seq=hole)                   # the hole, late: already accounted
    assert c.sseq == start + len(head) + 3000
    c.send(b"GET /next HTTP/1.1\r\n\r\n")
    c.reply(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    k = h.counters()
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1, (role(pod_is_client), "GET", 404, 80): 1}
    assert h.body_sums() == (0, 3000)
    assert k["pkt_gap_in_body"] - before["pkt_gap_in_body"] == 1
    assert k["pkt_desync"] == before["pkt_desync"]


@ROLES
def test_pipelined_messages_in_one_frame(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40006, pod_is_client).handshake()
    c.send(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(7)) +
           b"HEAD /h HTTP/1.1\r\n\r\n")
    c.reply(b"".join(RESP for _ in range(6)) + b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!" +
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")   # HEAD: no body follows
    c.send(REQ)
    c.reply(RESP)
    r = role(pod_is_client)
    assert h.requests() == {(r, "GET", 200, 80): 7, (r, "GET", 404, 80): 1, (r, "HEAD", 200, 80): 1}


SMALL_SCAN = 256   # header bytes per run: one 512-byte window, then a tail call


def pipelined_burst(h: Harness, pod_is_client: bool, n: int) -> None:
    """n pipelined requests in one frame, then their n responses in one frame (a GSO
    super-packet under load), under a per-run scan budget of one window: the requests take 3
    runs, the responses 4 or 5, so each frame is parsed by its program and tail calls. Every
    exchange counts, and nothing is given up as `scan_budget`."""
    c = Conv(h, 40030 + n, pod_is_client).handshake()
    before = h.counters()
    reqs = b"".join(b"GET /b/%d HTTP/1.1\r\n\r\n" % i for i in range(n))
    resps = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if i % 7 else
                     b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!" for i in range(n))
    # more than one run's budget (a 512-byte window), within one BPF_PROG_TEST_RUN skb (a page)
    assert 2 * 512 < len(reqs) and 3 * 512 < len(resps) < 3000
    c.send(reqs)
    c.reply(resps)
    c.send(REQ)
    c.reply(RESP)
    r = role(pod_is_client)
    n404 = len(range(0, n, 7))
    assert h.requests() == {(r, "GET", 200, 80): n - n404 + 1, (r, "GET", 404, 80): n404}
    k = h.counters()
    assert k["scan_budget"] == before["scan_budget"]
    assert k["no_response"] == before["no_response"]
    assert h.locks_held() == 0, "the continuation released the connection's lock"


@pytest.fixture(scope="module")
def small_harness() -> Iterator[Harness]:
    obj = bpf.BpfObject(bpf.object_path("l7pkt"))
    obj.set_rodata({"scan_max": SMALL_SCAN}, L7PktRodata)
    obj.load()
    try:
        yield Harness(obj)
    finally:
        obj.close()


@ROLES
@pytest.mark.parametrize("n", [50, 64])
def test_pipelined_burst_beyond_one_runs_budget(small_harness: Harness, pod_is_client: bool, n: int) -> None:
    small_harness.reset()
    pipelined_burst(small_harness, pod_is_client, n)


@ROLES
def test_pipelined_burst_of_64_at_the_agents_budget(h: Harness, pod_is_client: bool) -> None:
    pipelined_burst(h, pod_is_client, 64)


def lock_stamp(us_ago: int) -> int:
    """A lock word as pconn_lock() writes it: the holder's CLOCK_MONOTONIC in µs, never 0."""
    return ((time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> 10) - us_ago) & 0xFFFFFFFF | 1


@ROLES
def test_a_connection_another_cpu_parses_is_waited_for_never_parsed_twice(h: Harness, pod_is_client: bool) -> None:
    """Two CPUs on one connection (a veth delivers on the sender's CPU): the second waits
    for the first's lock. One that waits in vain leaves its segment unparsed and counted,
    and the gap shows at the next segment; a lock whose holder is gone stale is taken over."""
    c = Conv(h, 40041, pod_is_client).handshake()
    before = h.counters()
    c.send(REQ)
    assert h.locks_held() == 0
    h.set_lock(lock_stamp(0))            # held right now by "another CPU" that never lets go
    c.reply(RESP)                        # waits, in vain: not parsed
    k = h.counters()
    assert (k["pkt_contended"] - before["pkt_contended"], k["pkt_busy"] - before["pkt_busy"]) == (1, 1)
    assert h.requests() == {}
    h.set_lock(0)                        # released
    c.send(REQ)
    c.reply(RESP)                        # after the unparsed one: a gap in the headers
    k = h.counters()
    assert k["pkt_desync"] - before["pkt_desync"] == 1
    assert h.requests() == {}, "nothing guessed across the gap"
    c.send(REQ)                          # starts a segment: the stream resynchronises
    h.set_lock(lock_stamp(50_000))       # a holder 50 ms old: gone (an entry evicted under it)
    c.reply(RESP)
    k = h.counters()
    assert k["pkt_lock_stolen"] - before["pkt_lock_stolen"] == 1
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1}
    assert h.locks_held() == 0
    c.close()
    assert not list(h.obj.map("pkt_conns").keys_raw())


def path_texts(h: Harness) -> Dict[int, str]:
    """The ML_EV_PATH records waiting in the ring buffer (consumed): path id -> text."""
    got: Dict[int, str] = {}

    def on(data: bytes) -> None:
        if int.from_bytes(data[:4], "little") == EV_PATH:
            e = MlPathEvent.from_buffer_copy(data)
            got[e.path_id] = bytes(e.path)[: e.len].decode()
    rb = bpf.RingBuffer(h.obj.map("l7_events"), on)
    try:
        rb.consume()
    finally:
        rb.free()
    return got


@ROLES
@pytest.mark.parametrize("split", ["three segments", "one byte each"])
def test_a_path_split_over_segments_keeps_its_text(h: Harness, pod_is_client: bool, split: str) -> None:
    """The route's text is sent once per path, from the scratch; a path cut by segment
    boundaries is carried over in `path_carry`, so its text arrives with its first request
    (not "unknown" until the same path comes whole), and the carry is gone afterwards."""
    path_texts(h)
    path = "/carried/%s/%s/over-segments" % ("cli" if pod_is_client else "srv", split.split()[0])
    req = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
    cuts = (9, 23) if split == "three segments" else tuple(range(1, len(req)))   # both inside the path
    c = Conv(h, 40060 + len(cuts) + (0 if pod_is_client else 100), pod_is_client).handshake()
    for a, b in zip((0,) + cuts, cuts + (len(req),)):
        c.send(req[a:b])
    c.reply(RESP)
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1}
    (key,) = [MlHttpKey.from_buffer_copy(k) for k, _ in h.obj.map("http_stats").items_raw()]
    assert path_texts(h) == {key.path_id: path}
    assert list(h.obj.map("path_carry").keys_raw()) == []


@ROLES
def test_request_split_one_byte_per_segment(h: Harness, pod_is_client: bool) -> None:
    c = Conv(h, 40007, pod_is_client).handshake()
    for b in REQ:
        c.send(bytes([b]))
    for b in RESP:
        c.reply(bytes([b]))
    assert h.requests() == {(role(pod_is_client), "GET", 200, 80): 1}
    assert h.body_sums() == (0, 3)


def test_frames_cut_short_at_every_byte_count_nothing(h: Harness) -> None:
    """The request frame truncated at each length (the IP header still claims the whole
    packet): nothing parsed from it, so the response that follows pairs with nothing."""
    before = h.counters()
    full = frame(POD, PEER, 41000, 80, 1001, ACK | PSH, REQ)
    for n in range(len(full)):
        port = 41000 + n
        c = Conv(h, port).handshake()
        h.run(h.out, frame(POD, PEER, port, 80, c.cseq, ACK | PSH, REQ)[:n])
        c.reply(RESP)
    assert h.requests() == {}
    k = h.counters()
    assert k["pkt_unparsed"] - before["pkt_unparsed"] == len(full) - 34  # shorter ones the kernel refuses


@pytest.mark.parametrize("kind", ["tot_len_short", "tot_len_long", "doff_short", "doff_past_end"])
def test_lying_lengths_count_nothing(h: Harness, kind: str) -> None:
    c = Conv(h, 42000).handshake()
    if kind == "tot_len_short":
        data = frame(POD, PEER, 42000, 80, c.cseq, ACK | PSH, REQ, tot_len=12)
    elif kind == "tot_len_long":
        data = frame(POD, PEER, 42000, 80, c.cseq, ACK | PSH, REQ, tot_len=20 + 20 + len(REQ) + 200)
    elif kind == "doff_short":
        data = frame(POD, PEER, 42000, 80, c.cseq, ACK | PSH, REQ, doff=3)
    else:
        data = frame(POD, PEER, 42000, 80, c.cseq, ACK | PSH, b"", doff=15, options=False)
    before = h.counters()
    h.run(h.out, data)
    c.reply(RESP)
    assert h.requests() == {}
    assert h.counters()["pkt_unparsed"] - before["pkt_unparsed"] == 1


@pytest.mark.parametrize("seed", range(8))
def test_garbage_and_unsolicited_responses_count_nothing(h: Harness, seed: int) -> None:
    rng = random.Random(seed)
    c = Conv(h, 43000 + seed, pod_is_client=bool(seed % 2)).handshake()
    c.reply(RESP)                                       # a response nobody asked for
    for _ in range(20):
        c.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        c.reply(RESP)
    # random seqs on a fresh connection, everything looking like HTTP
    d = Conv(h, 44000 + seed).handshake()
    for _ in range(30):
        # request prefixes that never finish a request line: no request is ever whole
        d.send(REQ[: rng.randrange(1, len(b"GET /a HTTP/1.1"))], seq=d.cseq + rng.randrange(-50, 50), advance=False)
        d.reply(RESP, seq=d.sseq + rng.randrange(-50, 50), advance=False)
    assert h.requests() == {}


def test_other_methods_and_leading_empty_lines(h: Harness) -> None:
    """RFC 9112 §2.2 empty lines before a request, and methods outside RFC 9110 (_OTHER)."""
    c = Conv(h, 45000).handshake()
    c.send(b"\r\nPURGE /cache HTTP/1.1\r\nHost: x\r\n\r\n")
    c.reply(RESP)
    c.send(b"M-SEARCH * HTTP/1.1\r\nHost: x\r\n\r\n\r\n")
    c.reply(RESP)
    c.send(b"\r\nGET /a HTTP/1.1\r\n\r\n")
    c.reply(RESP)
    assert h.requests() == {(2, "_OTHER", 200, 80): 2, (2, "GET", 200, 80): 1}


def ipv6_ext_exchange(h: Harness, exts: Sequence[Tuple[int, int]]) -> None:
    """One IPv6 exchange whose every frame carries the extension headers `exts` ((kind,
    length units), in order) between the IPv6 header and TCP."""
    def f6(src, dst, sport, dport, seq, flags, payload=b""):
        th = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, flags, 65535, 0, 0)
        kinds = [k for k, _ in exts] + [6]
        ext = b"".join(pk.ipv6_ext(k, kinds[i + 1], length_units=u) for i, (k, u) in enumerate(exts))
        return pk.ethernet(0x86DD) + pk.ipv6_header(src, dst, kinds[0], len(ext) + len(th) + len(payload)) + ext + \
            th + payload
    pod, peer = "fd00:9::2", "fd00:9::1"
    h.run(h.out, f6(pod, peer, 46001, 8080, 10, SYN))
    h.run(h.into, f6(peer, pod, 8080, 46001, 500, SYN | ACK))
    h.run(h.out, f6(pod, peer, 46001, 8080, 11, ACK | PSH, REQ))
    h.run(h.into, f6(peer, pod, 8080, 46001, 501, ACK | PSH, RESP))


IPV6_EXTS = pytest.mark.parametrize("exts", [[(pk.HOP, 0)], [(pk.HOP, 1), (pk.DSTOPTS, 0), (pk.ROUTING, 2)],
                                             [(pk.HOP, 0), (pk.ROUTING, 0), (pk.DSTOPTS, 3), (pk.DSTOPTS, 0)]],
                                    ids=["hop", "hop-dst-routing", "four"])


@IPV6_EXTS
def test_ipv6_extension_headers_skipped(h: Harness, exts: Sequence[Tuple[int, int]]) -> None:
    ipv6_ext_exchange(h, exts)
    assert h.requests() == {(2, "GET", 200, 8080): 1}


@pytest.mark.parametrize("exts", [[(pk.DSTOPTS, 0)] * 5, [(pk.HOP, 0), (pk.FRAGMENT, 0)]], ids=["five", "fragment"])
def test_ipv6_too_many_extension_headers_or_a_fragment_count_nothing(h: Harness, exts) -> None:
    before = h.counters()
    ipv6_ext_exchange(h, exts)
    assert h.requests() == {}
    after = h.counters()
    unparsed = after["pkt_unparsed"] - before["pkt_unparsed"]
    assert unparsed == (4 if len(exts) == 5 else 0)   # more than 4 headers: not trusted, counted
    fragments = after["pkt_fragments"] - before["pkt_fragments"]
    assert fragments == (0 if len(exts) == 5 else 4)  # fragments: not reassembled, counted


def test_ipv4_fragments_of_a_dns_answer_count_nothing_and_are_counted(h: Harness) -> None:
    """A DNS answer split into IPv4 fragments (a large EDNS answer): the kernel does not
    reassemble, so no answer is paired, and every fragment is counted, not passed over silently."""
    dns_answers(h)
    c0 = h.counters()
    q = dns_msg(0x2345, "big.meshlens.test", 1)
    h.run(h.out, udp(POD, PEER, 40011, 53, q))
    ans = dns_msg(0x2345, "big.meshlens.test", 1, True)
    udp_part = struct.pack("!HHHH", 53, 40011, 8 + len(ans), 0) + ans
    first, rest = udp_part[:16], udp_part[16:]
    h.run(h.into, pk.ethernet(0x0800) + pk.ipv4_header(PEER, POD, 17, len(first), more_fragments=True) + first)
    h.run(h.into, pk.ethernet(0x0800) + pk.ipv4_header(PEER, POD, 17, len(rest), frag_offset=2) + rest)
    c1 = h.counters()
    d = {n: c1[n] - c0[n] for n in ("dns_queries", "dns_events", "pkt_fragments", "pkt_unparsed")}
    assert d == {"dns_queries": 1, "dns_events": 0, "pkt_fragments": 2, "pkt_unparsed": 0}


def test_ipv6_exchange(h: Harness) -> None:
    def f6(src, dst, sport, dport, seq, flags, payload=b""):
        th = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, flags, 65535, 0, 0)
        return pk.ethernet(0x86DD) + pk.ipv6_header(src, dst, 6, len(th) + len(payload)) + th + payload
    pod, peer = "fd00:9::2", "fd00:9::1"
    h.run(h.out, f6(pod, peer, 46000, 8080, 10, SYN))
    h.run(h.into, f6(peer, pod, 8080, 46000, 500, SYN | ACK))
    h.run(h.out, f6(pod, peer, 46000, 8080, 11, ACK | PSH, REQ))
    h.run(h.into, f6(peer, pod, 8080, 46000, 501, ACK | PSH, RESP))
    assert h.requests() == {(2, "GET", 200, 8080): 1}
    (k,) = [MlHttpKey.from_buffer_copy(k) for k, _ in h.obj.map("http_stats").items_raw()]
    assert bytes(k.server_addr) == ipaddress.IPv6Address(peer).packed


# ---- DNS, paired in the kernel -------------------------------------------------------------


def dns_msg(txid: int, name: str, qtype: int = 1, response: bool = False, rcode: int = 0) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    flags = (0x8180 | rcode) if response else 0x0100
    return struct.pack("!HHHHHH", txid, flags, 1, 1 if response else 0, 0, 0) + labels + b"\x00" + \
        struct.pack("!HH", qtype, 1) + (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x01\x02\x03" if response else b"")


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return pk.ethernet(0x0800) + pk.ipv4_header(src, dst, 17, 8 + len(payload)) + \
        pk.udp_header(sport, dport, len(payload)) + payload


def dns_answers(h: Harness) -> list:
    """The ML_EV_DNS records waiting in the ring buffer (consumed)."""
    got: list = []
    rb = bpf.RingBuffer(h.obj.map("l7_events"),
                        lambda data: got.append(MlDnsEvent.from_buffer_copy(data))
                        if int.from_bytes(data[:4], "little") == EV_DNS else None)
    try:
        rb.consume()
    finally:
        rb.free()
    return got


def test_dns_udp_paired_once_in_the_kernel(h: Harness) -> None:
    dns_answers(h)
    c0 = h.counters()
    q = dns_msg(0x1234, "web.meshlens.test", 28)
    h.run(h.out, udp(POD, PEER, 40001, 53, q))                                            # the pod asks
    h.run(h.into, udp(PEER, POD, 53, 40001, dns_msg(0x1234, "other.test", 28, True)))      # another question
    h.run(h.into, udp(PEER, POD, 53, 40002, dns_msg(0x1234, "web.meshlens.test", 28, True)))  # another port
    h.run(h.into, udp(PEER, POD, 53, 40001, dns_msg(0x1234, "web.meshlens.test", 1, True)))   # another type
    h.run(h.into, udp(PEER, POD, 53, 40001, dns_msg(0x1234, "web.meshlens.test", 28, True, 3)))  # the answer
    h.run(h.into, udp(PEER, POD, 53, 40001, dns_msg(0x1234, "web.meshlens.test", 28, True, 3)))  # again
    h.run(h.out, udp(POD, PEER, 40001, 53, b"\x00" * 11))                                   # too short
    h.run(h.out, udp(POD, PEER, 40001, 53, q[:12] + b"\xc0\x0c" + q[-4:]))                  # compressed question
    h.run(h.out, udp(POD, PEER, 40001, 53, dns_msg(7, "x.test", 1, True)))                 # a "query" with QR set
    h.run(h.into, udp(PEER, POD, 40001, 9999, q))                                            # not DNS: ignored
    c1 = h.counters()
    d = {n: c1[n] - c0[n] for n in ("dns_queries", "dns_unmatched", "dns_malformed", "dns_events", "dns_pending_full")}
    assert d == {"dns_queries": 1, "dns_unmatched": 4, "dns_malformed": 3, "dns_events": 1, "dns_pending_full": 0}
    ev = dns_answers(h)
    assert len(ev) == 1 and ev[0].dir == DNS_ANSWERED and ev[0].server_port == 53 and ev[0].netns == NETNS
    assert ev[0].payload[3] & 0xF == 3 and ev[0].len == len(dns_msg(1, "web.meshlens.test", 28, True))
    assert list(h.obj.map("dns_pending").keys_raw()) == []   # answered: no longer waiting


def test_dns_tcp_where_the_message_starts_a_segment(h: Harness) -> None:
    dns_answers(h)
    c0 = h.counters()
    q, a = dns_msg(77, "db.meshlens.test", 1), dns_msg(77, "db.meshlens.test", 1, True)
    h.run(h.out, frame(POD, PEER, 40100, 53, 1000, SYN))
    h.run(h.out, frame(POD, PEER, 40100, 53, 1001, ACK | PSH, struct.pack("!H", len(q)) + q))
    h.run(h.into, frame(PEER, POD, 53, 40100, 5001, ACK | PSH, struct.pack("!H", len(a)) + a[:40]))  # starts it
    h.run(h.into, frame(PEER, POD, 53, 40100, 5043, ACK | PSH, a[40:]))                              # the rest
    h.run(h.out, frame(POD, PEER, 40100, 53, 1003 + len(q), FIN | ACK))
    c1 = h.counters()
    d = {n: c1[n] - c0[n] for n in ("dns_queries", "dns_unmatched", "dns_events", "dns_tcp_skipped")}
    assert d == {"dns_queries": 1, "dns_unmatched": 0, "dns_events": 1, "dns_tcp_skipped": 1}, d
    ev = dns_answers(h)
    assert len(ev) == 1 and ev[0].dir == DNS_ANSWERED and ev[0].len == 40
    assert not h.requests(), "port-53 TCP is not HTTP"
