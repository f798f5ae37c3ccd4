"""L7 source: loads bpf/l7.bpf.c (HTTP/1.x and DNS from syscall tracepoints) and turns its
`http_stats` map and `l7_events` ring buffer into per-series HTTP golden signals.

kernel `http_stats` (in-kernel counters + exact-bucket histograms) + `l7_events` (path texts,
overflow and sampled request records, DNS messages) -> (this module: route templating via
agent/sources/l7/routes.py, DNS via agent/sources/l7/dns.DnsTracker) -> HttpSnapshot for
exporter/prometheus/http.py; DnsSource (agent/sources/l7/dns.py) exposes the DNS half under the "dns"
area. One BPF object serves both, so syscalls are inspected once.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import Signal, Variant, load_with_fallback
from meshlens.agent.sources.histogram import Histogram
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.l7.structs import (
    COUNTER_NAMES,
    DURATION_BOUNDS_S,
    EV_DNS,
    EV_HTTP_REQUEST,
    EV_PATH,
    EVENT_NAMES,
    F_OVERFLOW,
    F_REQ_SIZE,
    F_RESP_SIZE,
    F_SAMPLE,
    METHOD_NAMES,
    PARSE_ERRORS,
    ROLE_NAMES,
    SIZE_BOUNDS_BYTES,
    L7Rodata,
    MlDnsEvent,
    MlHttpEvent,
    MlHttpKey,
    MlHttpVal,
    MlPathEvent,
)
from meshlens.agent.sources.l7.routes import RouteConfig, RouteTable
from meshlens.agent.sources.base import AttachChoice, ObjectSource, Source, SourceHealth
from meshlens.agent.sources.tcp.structs import format_addr

if TYPE_CHECKING:  # dns_source imports this module
    from meshlens.agent.sources.l7.dns import DnsTracker

log = logging.getLogger("meshlens.http")


_SYSCALLS = ("read", "write", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev")


EXIT_PROGRAM = "exit_syscall"   # one exit program, attached to every sys_exit_<name> below


def _syscall_variant(names: Tuple[str, ...], with_exit: bool) -> Variant:
    progs = [f"enter_{n}" for n in names] + ([EXIT_PROGRAM] if with_exit else [])
    targets = [f"syscalls/sys_{d}_{n}" for n in names for d in ("enter", "exit")]
    return Variant("tracepoint", "tracepoint", tuple(progs), tuple(targets))


SIGNALS = (
    Signal("l7_payload", (_syscall_variant(_SYSCALLS, True),)),
    Signal("l7_close", (Variant("tracepoint", "tracepoint", ("enter_close", "l7_set_state"),
                                ("syscalls/sys_enter_close", "sock/inet_sock_set_state")),)),
    # glibc sends a lookup's A and AAAA queries with one sendmmsg
    Signal("dns_sendmmsg", (_syscall_variant(("sendmmsg",), False),), required=False),
)

@dataclass(frozen=True)
class HttpConfig:
    conns_max_entries: int = 16384
    stats_max_entries: int = 8192
    ringbuf_bytes: int = 1 << 20
    sample_every: int = 0              # 1 in N requests as a tap record; 0 = off
    routes: RouteConfig = field(default_factory=RouteConfig)
    tap_len: int = 5000                # sampled records kept between two sweeps (overflow is counted)
    idle_evict_s: float = 300.0        # kernel entries unchanged this long move to user space
    retired_ttl_s: float = 900.0       # ...and their series stop being exported this much later


@dataclass(frozen=True)
class HttpSeriesKey:
    role: str                 # "server" | "client"
    process: str
    cgroup_id: int
    netns: int
    method: str
    status: int
    route: str
    server_address: str       # client role: the peer; server role: the local address
    server_port: int


@dataclass
class HttpStats:
    count: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BOUNDS_S))
    request_body: Histogram = field(default_factory=lambda: Histogram(SIZE_BOUNDS_BYTES))
    response_body: Histogram = field(default_factory=lambda: Histogram(SIZE_BOUNDS_BYTES))

    def add_kernel(self, v: MlHttpVal) -> None:
        self.count += v.count
        _add_counts(self.duration, v.duration_buckets, v.duration_ns_sum / 1e9, v.count)
        _add_counts(self.request_body, v.req_body_buckets, float(v.req_body_sum), v.req_body_count)
        _add_counts(self.response_body, v.resp_body_buckets, float(v.resp_body_sum), v.resp_body_count)

    def merge(self, o: "HttpStats") -> None:
        self.count += o.count
        for mine, theirs in ((self.duration, o.duration), (self.request_body, o.request_body),
                             (self.response_body, o.response_body)):
            mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
            mine.total += theirs.total
            mine.count += theirs.count


def _add_counts(h: Histogram, buckets, total: float, count: int) -> None:
    for i in range(len(h.counts)):
        h.counts[i] += buckets[i]
    h.total += total
    h.count += count


@dataclass(frozen=True)
class TapRecord:
    ts_ns: int
    key: HttpSeriesKey
    duration_s: float
    request_body: Optional[int]
    response_body: Optional[int]
    peer_address: str = ""    # the other end: the client for server-role records, else the server
    client_address: str = ""  # the client's end of the connection (either role), from the packet
    client_port: int = 0      # or socket that carried the request; 0 where the kernel gave none


@dataclass(frozen=True)
class HttpSnapshot:
    series: Dict[HttpSeriesKey, HttpStats]
    parse_errors: Dict[str, int]
    route_overflows: int
    overflow_records: int
    tap: Tuple[TapRecord, ...] = ()
    tap_dropped: int = 0          # sampled records pushed out of the bounded tap deque unread


class HttpSource(ObjectSource):
    name = "http"

    def __init__(self, config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None,
                 dns: Optional["DnsTracker"] = None) -> None:
        from meshlens.agent.sources.l7.dns import DnsTracker  # local: dns_source imports this module's siblings

        self.config = config
        self.features = features or KernelFeatures.probe()
        self.routes = RouteTable(config.routes)
        self.dns = dns or DnsTracker()
        self.obj: Optional[bpf.BpfObject] = None
        self._rb: Optional[bpf.RingBuffer] = None
        self._choices: List[AttachChoice] = []
        self.events_read: Dict[str, int] = {n: 0 for n in EVENT_NAMES.values()}
        self.decode_errors = 0
        self._retired: Dict[HttpSeriesKey, HttpStats] = {}   # overflow records + evicted entries
        self._last_change: Dict[bytes, Tuple[int, float]] = {}  # kernel key -> (count, when it changed)
        self._retired_touched: Dict[HttpSeriesKey, float] = {}
        self.evicted = 0
        self.retired_expired = 0
        self._overflow_records = 0
        self._tap: Deque[TapRecord] = collections.deque(maxlen=config.tap_len)
        self._tap_dropped = 0
        self._tap_every = 0            # the runtime switch's value (0: off)
        self._tap_new = 0              # sampled records since the last sweep
        self._tap_mark = time.monotonic()
        self._tap_lost_seen = 0        # tap deque drops + ring-buffer-full count at the last sweep
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}
        self._entries: Dict[str, int] = {}
        self._snapshot = HttpSnapshot({}, {}, 0, 0)
        self._covered: set = set()   # netns inodes whose pod veth the packet path parses

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        obj.map("http_conns").max_entries = self.config.conns_max_entries
        obj.map("http_stats").max_entries = self.config.stats_max_entries
        obj.map("l7_events").max_entries = self.config.ringbuf_bytes
        obj.set_rodata({"sample_every": self.config.sample_every, "self_tgid": os.getpid(),
                        "have_rdonly_cast": int(self.features.kernel_btf_function("bpf_rdonly_cast"))}, L7Rodata)

    def start(self) -> None:
        self.obj, self._choices = load_with_fallback(bpf.object_path("l7"), SIGNALS, self.features, self._configure)
        try:
            chosen = {c.signal for c in self._choices if c.chosen}
            exits = [n for n in _SYSCALLS if n != "read"] + (["sendmmsg"] if "dns_sendmmsg" in chosen else [])
            for n in exits:
                self.obj.attach_tracepoint(EXIT_PROGRAM, "syscalls", f"sys_exit_{n}")
            self._rb = bpf.RingBuffer(self.obj.map("l7_events"), self._on_event)
            for netns in list(self._covered):
                self._write_covered(netns, True)
        except Exception:
            self.stop()
            raise
        for ch in self._choices:
            log.info("l7: %s via %s", ch.signal, ch.chosen)

    def cover_netns(self, netns: int, covered: bool) -> None:
        """The packet path parses (or no longer parses) this pod's veth: its sockets' traffic
        to non-loopback peers is skipped here (or followed again), so it is counted once.
        Called from the packet source's link-watch thread."""
        if covered:
            self._covered.add(netns)
        else:
            self._covered.discard(netns)
        if self.obj:
            self._write_covered(netns, covered)

    def uncover_all(self) -> None:
        """Parse every pod's sockets here again (the packet path is gone)."""
        for netns in list(self._covered):
            self.cover_netns(netns, False)

    def _write_covered(self, netns: int, covered: bool) -> None:
        key = netns.to_bytes(4, "little")
        try:
            if covered:
                self.obj.map("pkt_netns").update_raw(key, b"\x01")
            else:
                self.obj.map("pkt_netns").delete_raw(key)
        except bpf.BpfError as exc:
            log.warning("l7: pkt_netns: %s", exc)

    # ---- events --------------------------------------------------------------------------
    def _on_event(self, data: bytes) -> None:
        if len(data) < 4:
            self.decode_errors += 1
            return
        etype = int.from_bytes(data[:4], "little")
        name = EVENT_NAMES.get(etype)
        if name is None:
            self.decode_errors += 1
            return
        self.events_read[name] += 1
        if etype == EV_PATH and len(data) >= ctypes.sizeof(MlPathEvent):
            ev = MlPathEvent.from_buffer_copy(data)
            self.routes.learn_path(ev.path_id, bytes(ev.path)[: min(ev.len, len(ev.path))])
        elif etype == EV_HTTP_REQUEST and len(data) >= ctypes.sizeof(MlHttpEvent):
            self._on_request(MlHttpEvent.from_buffer_copy(data))
        elif etype == EV_DNS and len(data) >= ctypes.sizeof(MlDnsEvent):
            self.dns.on_event(MlDnsEvent.from_buffer_copy(data))
        else:
            self.decode_errors += 1

    def _on_request(self, ev: MlHttpEvent) -> None:
        req = ev.req_body if ev.flags & F_REQ_SIZE else None
        resp = ev.resp_body if ev.flags & F_RESP_SIZE else None
        if ev.flags & F_OVERFLOW:
            # the kernel map was full: aggregate here, under the series key (routes are
            # capped, so this stays bounded); the path text always precedes its request
            self._overflow_records += 1
            key = self._series_key(ev.key)
            st = self._retired.setdefault(key, HttpStats())
            self._retired_touched[key] = time.monotonic()
            st.count += 1
            st.duration.observe(ev.duration_ns / 1e9)
            if req is not None:
                st.request_body.observe(float(req))
            if resp is not None:
                st.response_body.observe(float(resp))
        if ev.flags & F_SAMPLE:
            key = self._series_key(ev.key)
            peer = format_addr(ev.key.family, ev.key.client_addr) if key.role == "server" else key.server_address
            client = format_addr(ev.key.family, ev.client_addr) if ev.client_port else ""
            self._tap_new += 1
            if len(self._tap) == self._tap.maxlen:
                self._tap_dropped += 1
            self._tap.append(TapRecord(ev.ts_ns, key, ev.duration_ns / 1e9, req, resp, peer, client, ev.client_port))

    # ---- tap switch ----------------------------------------------------------------------
    def set_tap_sampling(self, every: int) -> None:
        """Runtime tap switch (the kernel's `tap_ctl` map): one request in `every` becomes a
        tap record; 0 turns sampling off (back to the load-time `sample_every`)."""
        if self.obj is None:
            return
        if not self._tap_every:  # turning on: losses from before do not count
            self._tap_lost_seen = self._tap_dropped + self._kernel.get("ringbuf_full", 0)
        self._tap_every = max(0, int(every))
        self.obj.map("tap_ctl").update_raw((0).to_bytes(4, "little"), self._tap_every.to_bytes(4, "little"))

    def _adapt_tap(self, now: float) -> None:
        """While tapping, sample every request unless records are being lost (the tap deque
        overflowed between two sweeps, or the ring buffer was full): then sample 1 in N,
        N doubled per lossy sweep, and halved again once the sampled rate is well under what
        one sweep's deque holds. A quiet pod on a busy node is therefore not diluted by the
        node's other traffic unless the agent really cannot keep up."""
        elapsed, self._tap_mark = now - self._tap_mark, now
        new, self._tap_new = self._tap_new, 0
        lost = self._tap_dropped + self._kernel.get("ringbuf_full", 0)
        lossy, self._tap_lost_seen = lost > self._tap_lost_seen, lost
        if not self._tap_every or elapsed <= 0:
            return
        every = self._tap_every
        if lossy:
            every = min(1 << 20, every * 2)
        elif every > 1 and new < self.config.tap_len / 4:
            every = max(1, every // 2)
        if every != self._tap_every:
            self.set_tap_sampling(every)

    # ---- sweeps --------------------------------------------------------------------------
    def _series_key(self, k: MlHttpKey) -> HttpSeriesKey:
        return HttpSeriesKey(
            role=ROLE_NAMES.get(k.role, "unknown"),
            process=k.comm.decode("utf-8", "replace"),
            cgroup_id=k.cgroup_id,
            netns=k.netns,
            method=METHOD_NAMES.get(k.method, "_OTHER"),
            status=k.status,
            route=self.routes.route(k.cgroup_id, k.path_id),
            server_address=format_addr(k.family, k.server_addr),
            server_port=k.server_port,
        )

    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        if self._rb:
            self._rb.consume()   # path texts first, so new ids get their route
        series: Dict[HttpSeriesKey, HttpStats] = {}
        m = self.obj.map("http_stats")
        raw_items = m.items_raw()
        self._entries = {"http_stats": len(raw_items)}
        crowded = len(raw_items) > 0.8 * self.config.stats_max_entries
        now = time.monotonic()
        seen = set()
        for kraw, vraw in raw_items:
            v = MlHttpVal.from_buffer_copy(vraw)
            sk = self._series_key(MlHttpKey.from_buffer_copy(kraw))
            prev = self._last_change.get(kraw)
            if prev is None or prev[0] != v.count:
                self._last_change[kraw] = (v.count, now)
            idle = prev is not None and prev[0] == v.count
            if idle and (crowded or now - self._last_change[kraw][1] >= self.config.idle_evict_s):
                # Retire an idle entry: its totals move to user space so counters stay
                # monotonic, and the kernel slot is free for new series. An increment landing
                # between the read above and this delete is lost (idle entries only).
                if m.delete_raw(kraw):
                    self.evicted += 1
                    self._retired.setdefault(sk, HttpStats()).add_kernel(v)
                    self._retired_touched[sk] = now
                    self._last_change.pop(kraw, None)
                    continue
            seen.add(kraw)
            series.setdefault(sk, HttpStats()).add_kernel(v)
            if sk in self._retired_touched:
                self._retired_touched[sk] = now   # still alive in the kernel: keep its history
        for kraw in [k for k in self._last_change if k not in seen]:
            del self._last_change[kraw]
        for sk in [k for k, t in self._retired_touched.items() if now - t >= self.config.retired_ttl_s]:
            # a series nothing has added to for the TTL (a workload that went away) expires,
            # so user-space memory stays bounded
            self._retired.pop(sk, None)
            del self._retired_touched[sk]
            self.retired_expired += 1
        for sk, st in self._retired.items():
            series.setdefault(sk, HttpStats()).merge(st)
        sums = self.obj.map("l7_counters").percpu_u64_sums()
        self._kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}
        self.dns.sweep(time.monotonic_ns())
        self._adapt_tap(now)
        self._snapshot = HttpSnapshot(
            series=series,
            parse_errors={n: self._kernel.get(n, 0) for n in PARSE_ERRORS},
            route_overflows=self.routes.overflowed,
            overflow_records=self._overflow_records,
            tap=tuple(self._tap),
            tap_dropped=self._tap_dropped,
        )

    # ---- views -------------------------------------------------------------------------
    def snapshot(self) -> HttpSnapshot:
        return self._snapshot

    def kernel_counters(self) -> Dict[str, int]:
        return dict(self._kernel)

    def health(self) -> SourceHealth:
        k = self._kernel
        return SourceHealth(
            events_read=dict(self.events_read),
            events_lost={"ringbuf_full": k.get("ringbuf_full", 0), "map_full": k.get("stats_full", 0),
                         "conns_full": k.get("conns_full", 0), "args_full": k.get("args_full", 0)},
            map_entries=dict(self._entries),
            map_capacity={"http_stats": self.config.stats_max_entries},
            kernel_counters=dict(k),
            callback_errors=(self._rb.callback_errors if self._rb else 0) + self.decode_errors,
        )


def l7_sources(config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None) -> List[Source]:
    """The HTTP source and the DNS view over the same BPF object, for the runner's list."""
    from meshlens.agent.sources.l7.dns import DnsSource

    http = HttpSource(config, features)
    return [http, DnsSource(http)]
