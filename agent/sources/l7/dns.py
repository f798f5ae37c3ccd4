"""DNS golden signals: pairs the kernel's DNS query/response records by (socket, txid).

l7.bpf.c `l7_events` (ML_EV_DNS records, read by agent/sources/l7/http.HttpSource's ring buffer)
-> DnsTracker (parse with agent/sources/l7/dns_wire.py, pair, time, aggregate per series) -> DnsSnapshot
-> exporter/prometheus/dns.py. DnsSource is the "dns" area's Source: a view over the tracker
that the HTTP source feeds, so the one BPF object is loaded once.

The packet path (l7pkt.bpf.c) pairs in the kernel: only answered lookups arrive
(DNS_ANSWERED, with the latency), and its counts of queries, unmatched and malformed messages
come from kernel counters (`kernel_totals`); agent/sources/l7/packets.py expires its queries
that wait too long and counts them here as unanswered.

Bounded: at most `max_pending` queries wait for a response (older ones are expired after
`timeout_s` or evicted, both counted as unanswered); question names per workload are capped.

Followers (the gRPC flow stream, exporter/grpc/observer.py): `subscribe()` hands every answered
lookup, and every query given up unanswered, to the callback as one DnsLookup, in the thread
that reads the ring buffer or sweeps. The syscall path knows each query itself; the packet path
sends its queries (ML_DNS_ASKED) only while the tap switch is on, and names an unanswered one
when its sweep deletes the kernel's waiting entry (`kernel_expired`). Nothing is kept for
followers while nobody follows.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.l7.dns_wire import DnsMessage, parse
from meshlens.agent.sources.histogram import Histogram
from meshlens.agent.sources.l7.structs import DNS_ANSWERED, DNS_ASKED, DNS_QUERY, DNS_RESPONSE, MlDnsEvent
from meshlens.agent.sources.base import AttachChoice, Source, SourceHealth
from meshlens.agent.sources.tcp.structs import format_addr

log = logging.getLogger("meshlens.dns")

DNS_DURATION_BOUNDS_S: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
OVERFLOW_NAME = "__overflow__"


@dataclass(frozen=True)
class DnsSeriesKey:
    process: str
    cgroup_id: int
    netns: int
    server_address: str
    server_port: int
    question_type: str
    response_code: str
    question_name: str


@dataclass
class DnsStats:
    count: int = 0
    answers: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(DNS_DURATION_BOUNDS_S))


@dataclass(frozen=True)
class DnsSnapshot:
    series: Dict[DnsSeriesKey, DnsStats]
    unanswered: int
    malformed: int
    unmatched_responses: int
    queries: int


@dataclass
class _Pending:
    ts_ns: int
    msg: DnsMessage
    ev_meta: Tuple[str, int, int, str, int]   # process, cgroup, netns, server addr, port
    client: Tuple[str, int] = ("", 0)         # the querying socket's address and port


@dataclass(frozen=True)
class DnsLookup:
    """One DNS exchange for followers: answered, or given up after the timeout."""

    ts_ns: int             # CLOCK_MONOTONIC: the answer's arrival, or when the query was given up
    query_ts_ns: int       # when the query was sent
    answered: bool
    query: str             # question name, with the trailing dot
    qtype: str
    rcode: str             # "" when unanswered
    answers: int           # answer records (ANCOUNT)
    latency_s: float       # query -> answer (the kernel's measure on the packet path); 0 unanswered
    txid: int
    process: str
    cgroup_id: int
    netns: int
    server_address: str
    server_port: int
    client_address: str
    client_port: int


def _meta(ev: MlDnsEvent, process: str) -> Tuple[str, int, int, str, int]:
    return (process, ev.cgroup_id, ev.netns, format_addr(ev.family, ev.server_addr), ev.server_port)


def _client(ev: MlDnsEvent) -> Tuple[str, int]:
    return (format_addr(ev.family, ev.client_addr), ev.client_port)


FNV64_OFFSET, FNV64_PRIME = 14695981039346656037, 1099511628211


def conn_key_hash(raw: bytes) -> int:
    """l7pkt_core.h's key_hash(): FNV-1a over the u32 words of a struct ml_pkt_conn_key, the
    `sk` of the packet path's DNS records (so a dns_pending entry names its ASKED record)."""
    h = FNV64_OFFSET
    for i in range(0, len(raw) - len(raw) % 4, 4):
        h = ((h ^ int.from_bytes(raw[i:i + 4], "little")) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


class DnsTracker:
    def __init__(self, max_pending: int = 4096, timeout_s: float = 10.0, max_names_per_workload: int = 100,
                 max_series: int = 10_000, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.max_pending = max_pending
        self.timeout_ns = int(timeout_s * 1e9)
        self.max_names = max_names_per_workload
        self.max_series = max_series
        self._clock = clock
        self._pending: "OrderedDict[Tuple[int, int], _Pending]" = OrderedDict()
        self._series: Dict[DnsSeriesKey, DnsStats] = {}
        self._names: Dict[Hashable, set] = {}
        self.unanswered = 0
        self.malformed = 0
        self.unmatched = 0
        self.queries = 0
        self.series_overflow = 0
        # per feeding source: cumulative kernel counts ("queries", "unmatched", "malformed",
        # "unanswered") of a path that pairs in the kernel
        self._kernel: Dict[Hashable, Dict[str, int]] = {}
        self._followers: List[Callable[[DnsLookup], None]] = []
        # packet path, while followed: queries waiting in the kernel (ASKED), by (sk, txid)
        self._asked: "OrderedDict[Tuple[int, int], _Pending]" = OrderedDict()
        self.asked_evicted = 0      # ASKED records pushed out by max_pending (their query unnamed)
        self.follow_errors = 0      # follower callbacks that raised

    # ---- followers ---------------------------------------------------------------------
    def subscribe(self, fn: Callable[[DnsLookup], None]) -> Callable[[], None]:
        """`fn` gets every DnsLookup from now on; returns the unsubscribe function."""
        self._followers = self._followers + [fn]

        def unsubscribe() -> None:
            # the ASKED records are dropped by the reader's thread (its next sweep), not here
            self._followers = [f for f in self._followers if f is not fn]
        return unsubscribe

    @property
    def followed(self) -> bool:
        return bool(self._followers)

    def _publish(self, p: _Pending, ts_ns: int, resp: Optional[DnsMessage], seconds: float) -> None:
        process, cg, netns, addr, port = p.ev_meta
        lk = DnsLookup(ts_ns, p.ts_ns, resp is not None, p.msg.qname, p.msg.qtype_name,
                       resp.rcode_name if resp is not None else "", resp.ancount if resp is not None else 0,
                       seconds, p.msg.txid, process, cg, netns, addr, port, p.client[0], p.client[1])
        for fn in self._followers:
            try:
                fn(lk)
            except Exception:  # noqa: BLE001 - a follower must not stop the reader
                self.follow_errors += 1
                log.debug("dns follower failed", exc_info=True)

    def _unanswered(self, p: _Pending, now_ns: int) -> None:
        if self._followers:
            self._publish(p, now_ns, None, 0.0)

    def kernel_expired(self, sk: int, txid: int, now_ns: int) -> None:
        """Packet path: the sweep deleted the kernel's entry of this unanswered query."""
        p = self._asked.pop((sk, txid), None)
        if p is not None:
            self._unanswered(p, now_ns)

    def kernel_totals(self, source: Hashable, totals: Dict[str, int]) -> None:
        """The latest cumulative kernel counts of `source` (replaces its previous ones)."""
        self._kernel[source] = dict(totals)

    def _kernel_sum(self, name: str) -> int:
        return sum(t.get(name, 0) for t in self._kernel.values())

    def on_event(self, ev: MlDnsEvent) -> None:
        msg = parse(bytes(ev.payload)[: min(ev.len, len(ev.payload))])
        if msg is None:
            self.malformed += 1
            return
        key = (ev.sk, msg.txid)
        if ev.dir == DNS_ANSWERED:
            # paired by the kernel with a query of the same id, tuple and question
            if not msg.is_response:
                self.malformed += 1
                return
            # the series carry no process on this path (a packet names none; cgroup_skb's
            # comm is the socket's creator): the stream's record does, where it is known
            self._observe(_Pending(ev.ts_ns - ev.duration_ns, msg, _meta(ev, "")), msg, ev.duration_ns / 1e9)
            if self._followers:
                self._asked.pop(key, None)
                p = _Pending(ev.ts_ns - ev.duration_ns, msg, _meta(ev, ev.comm.decode("utf-8", "replace")),
                             _client(ev))
                self._publish(p, ev.ts_ns, msg, ev.duration_ns / 1e9)
        elif ev.dir == DNS_ASKED and not msg.is_response:
            # packet path, tap on: counted by the kernel already; kept only to name a timeout
            if not self._followers:
                return
            self._asked.pop(key, None)
            self._asked[key] = _Pending(ev.ts_ns, msg, _meta(ev, ev.comm.decode("utf-8", "replace")), _client(ev))
            while len(self._asked) > self.max_pending:
                self._asked.popitem(last=False)
                self.asked_evicted += 1
        elif ev.dir == DNS_QUERY and not msg.is_response:
            self.queries += 1
            self._pending.pop(key, None)
            self._pending[key] = _Pending(ev.ts_ns, msg, _meta(ev, ev.comm.decode("utf-8", "replace")), _client(ev))
            while len(self._pending) > self.max_pending:
                _, old = self._pending.popitem(last=False)
                self.unanswered += 1
                self._unanswered(old, ev.ts_ns)
        elif ev.dir == DNS_RESPONSE and msg.is_response:
            p = self._pending.pop(key, None)
            if p is None or p.msg.qname != msg.qname or p.msg.qtype != msg.qtype:
                self.unmatched += 1
                return
            seconds = max(0, ev.ts_ns - p.ts_ns) / 1e9
            self._observe(p, msg, seconds)
            if self._followers:
                self._publish(p, ev.ts_ns, msg, seconds)
        else:
            self.malformed += 1

    def _name_label(self, cgroup_id: int, qname: str) -> str:
        names = self._names.setdefault(cgroup_id, set())
        if qname in names:
            return qname
        if len(names) >= self.max_names:
            return OVERFLOW_NAME
        names.add(qname)
        return qname

    def _observe(self, p: _Pending, resp: DnsMessage, seconds: float) -> None:
        process, cg, netns, addr, port = p.ev_meta
        k = DnsSeriesKey(process, cg, netns, addr, port, p.msg.qtype_name, resp.rcode_name,
                         self._name_label(cg, p.msg.qname))
        st = self._series.get(k)
        if st is None:
            if len(self._series) >= self.max_series:
                self.series_overflow += 1
                return
            st = self._series[k] = DnsStats()
        st.count += 1
        st.answers += resp.ancount
        st.duration.observe(seconds)

    def sweep(self, now_ns: int) -> None:
        """Expire queries older than the timeout (kernel ts and now_ns share CLOCK_MONOTONIC)."""
        while self._pending:
            key, p = next(iter(self._pending.items()))
            if now_ns - p.ts_ns < self.timeout_ns:
                break
            self._pending.popitem(last=False)
            self.unanswered += 1
            self._unanswered(p, now_ns)
        if not self._followers:
            self._asked.clear()      # nobody follows any more
        # ASKED records whose kernel entry went without a word (its answer record lost to a
        # full ring buffer, which is counted there): forgotten after twice the timeout
        while self._asked:
            key, p = next(iter(self._asked.items()))
            if now_ns - p.ts_ns < 2 * self.timeout_ns:
                break
            self._asked.popitem(last=False)

    def snapshot(self) -> DnsSnapshot:
        series = {}
        for k, st in self._series.items():
            series[k] = DnsStats(st.count, st.answers, st.duration.copy())
        return DnsSnapshot(series, self.unanswered + self._kernel_sum("unanswered"),
                           self.malformed + self._kernel_sum("malformed"),
                           self.unmatched + self._kernel_sum("unmatched"),
                           self.queries + self._kernel_sum("queries"))


class DnsSource(Source):
    """The "dns" area: a view over the DnsTracker fed by the HTTP source's BPF object."""

    name = "dns"

    def __init__(self, feeder: "Source") -> None:
        self.feeder = feeder
        self.tracker: DnsTracker = feeder.dns  # type: ignore[attr-defined]
        self._snapshot = self.tracker.snapshot()

    def start(self) -> None:
        if getattr(self.feeder, "obj", None) is None:
            raise RuntimeError("dns: the http source (which loads l7.bpf.o) must start first")

    def ring_buffers(self) -> List[bpf.RingBuffer]:
        return []

    def sweep(self, now_ns: int) -> None:
        self._snapshot = self.tracker.snapshot()

    def snapshot(self) -> DnsSnapshot:
        return self._snapshot

    def health(self) -> SourceHealth:
        t = self.tracker
        snap = t.snapshot()
        k = self.feeder.kernel_counters() if hasattr(self.feeder, "kernel_counters") else {}
        return SourceHealth(
            events_read={"dns": snap.queries},
            events_lost={"unanswered": snap.unanswered, "malformed": snap.malformed,
                         "unmatched_response": snap.unmatched_responses, "series_overflow": t.series_overflow,
                         # flow stream: queries whose ASKED record was pushed out (an unanswered one
                         # then goes unnamed), follower callbacks that raised
                         "stream_asked_evicted": t.asked_evicted, "stream_follow_errors": t.follow_errors},
            map_entries={},
            map_capacity={},
            kernel_counters={"dns_events": k.get("dns_events", 0), "dns_truncated": k.get("dns_truncated", 0)},
        )

    def attach_report(self) -> List[AttachChoice]:
        return [c for c in self.feeder.attach_report() if c.signal.startswith("dns")]

    def stop(self) -> None:
        pass
