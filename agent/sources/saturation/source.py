"""Saturation source: how close each pod's network path is to its limits (bpf/saturation.bpf.c).

kernel maps `drops`, `sock_events`, `counters` + the iter/tcp program run in every network
namespace (agent/sources/saturation/netns.py) + per-namespace sysctls -> sweep (this module)
-> SatSnapshot -> agent/aggregate/saturation.py (per-workload summary) and
exporter/prometheus/saturation.py. Keys carry kernel facts only (netns inode, cgroup id,
peer address); the identity layer names them.

Every signal is optional: a kernel without one of the tracepoints still runs the others,
and `meshlens check` names what is missing.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import Signal, Variant, load_with_fallback
from meshlens.agent.kernel.bpf_iter import attach_iter, read_iter
from meshlens.agent.kernel.drop_reasons import reason_name
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.kernel.libbpf import num_possible_cpus
from meshlens.agent.sources.base import AttachChoice, ObjectSource, SourceHealth
from meshlens.agent.sources.saturation.netns import NetnsVisitor, read_sysctl_ints
from meshlens.agent.sources.saturation.structs import (
    BUF_LIMIT,
    BUF_LIMIT_NAMES,
    COUNTER_NAMES,
    KIND_NAMES,
    RCVBUF_DROP,
    REC_LISTEN,
    REC_SUMMARY,
    REC_ZEROWIN,
    SOCK_ERROR,
    ZW_LOCAL,
    ZW_PEER,
    SatDropKey,
    SatIterCfg,
    SatSockKey,
    errno_name,
    format_addr,
    iter_records,
    protocol_name,
)

log = logging.getLogger("meshlens.saturation")

ITER_PROGRAM = "sat_iter_tcp"
SIGNALS = (
    Signal("drops", (Variant("tracepoint", "tracepoint", ("handle_sat_kfree_skb",), ("skb/kfree_skb",)),),
           required=False),
    Signal("rcvqueue_full", (Variant("raw_tracepoint", "tracepoint", ("handle_sat_rcvqueue_full",),
                                     ("sock/sock_rcvqueue_full",)),), required=False),
    Signal("buf_limit", (Variant("raw_tracepoint", "tracepoint", ("handle_sat_buf_limit",),
                                 ("sock/sock_exceed_buf_limit",)),), required=False),
    Signal("socket_errors", (Variant("raw_tracepoint", "tracepoint", ("handle_sat_error_report",),
                                     ("sock/inet_sk_error_report",)),), required=False),
    Signal("port_exhaustion", (Variant("tracepoint", "tracepoint", ("handle_sat_set_state",),
                                       ("sock/inet_sock_set_state",)),), required=False),
)
IPPORT_SYSCTL = "/proc/sys/net/ipv4/ip_local_port_range"
CT_COUNT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_count"
CT_MAX_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_max"


@dataclass(frozen=True)
class SatConfig:
    drops_max_entries: int = 4096
    sock_events_max_entries: int = 4096
    # How often the socket walk (iter/tcp in every namespace, plus the sysctls) runs. It runs
    # in its own thread and never delays a sweep, but each namespace's walk goes over the
    # node's whole TCP hash table (about 30 ms per namespace with 60k sockets on the node,
    # measured), so it is the one cost here that grows with the node, not with events.
    walk_interval_s: float = 10.0


@dataclass(frozen=True)
class Listener:
    cgroup_id: int
    queue: int        # sk_ack_backlog: connections waiting for accept()
    limit: int        # sk_max_ack_backlog: the listen() backlog (capped by somaxconn)
    overflows: int    # the listener's drop counter (tcp_listendrop: ListenOverflows/ListenDrops)


@dataclass(frozen=True)
class EphemeralPorts:
    in_use: int       # distinct local ports inside the range held by a socket (not listening)
    low: int
    high: int
    sockets: int = 0  # sockets on those ports (connections to different peers can share one)

    @property
    def size(self) -> int:
        return max(0, self.high - self.low + 1)


@dataclass(frozen=True)
class Conntrack:
    count: int
    limit: int


@dataclass(frozen=True)
class SatSnapshot:
    drops: Dict[Tuple[int, int, str, str], int] = field(default_factory=dict)
    # (netns, cgroup, protocol, reason)
    sock_events: Dict[Tuple[int, int, str, str, str], int] = field(default_factory=dict)
    # (netns, cgroup, peer address, kind, detail): kinds in structs.KIND_NAMES
    listeners: Dict[Tuple[int, str, int], Listener] = field(default_factory=dict)
    # (netns, local address, port)
    zero_window: Dict[Tuple[int, int, str, str], int] = field(default_factory=dict)
    # (netns, cgroup, peer address, side local|peer) -> connections at zero window
    ephemeral: Dict[int, EphemeralPorts] = field(default_factory=dict)
    conntrack: Dict[int, Conntrack] = field(default_factory=dict)


@dataclass
class NetnsView:
    records: bytes
    port_range: Tuple[int, ...]
    conntrack: Tuple[Tuple[int, ...], Tuple[int, ...]]


def _detail(kind: int, detail: int) -> str:
    if kind == SOCK_ERROR:
        return errno_name(detail)
    if kind == RCVBUF_DROP:
        return reason_name(detail)
    if kind == BUF_LIMIT:
        return BUF_LIMIT_NAMES.get(detail, str(detail))
    return ""


def fold_records(views: Dict[int, NetnsView]) -> Tuple[Dict, Dict, Dict, Dict]:
    """Iterator records and sysctls of every namespace -> listeners, zero window, ports, conntrack."""
    listeners: Dict[Tuple[int, str, int], Listener] = {}
    zero: Dict[Tuple[int, int, str, str], int] = {}
    ports: Dict[int, EphemeralPorts] = {}
    ct: Dict[int, Conntrack] = {}
    for netns, view in views.items():
        in_use = sockets = 0
        for r in iter_records(view.records):
            if r.kind == REC_LISTEN:
                key = (netns, format_addr(r.family, r.addr), r.port)
                prev = listeners.get(key)  # SO_REUSEPORT groups: one series per address and port
                listeners[key] = Listener(r.cgroup_id, r.a + (prev.queue if prev else 0),
                                          r.b + (prev.limit if prev else 0), r.drops + (prev.overflows if prev else 0))
            elif r.kind == REC_ZEROWIN:
                peer = format_addr(r.family, r.addr)
                for bit, side in ((ZW_LOCAL, "local"), (ZW_PEER, "peer")):
                    if r.c & bit:
                        k = (netns, r.cgroup_id, peer, side)
                        zero[k] = zero.get(k, 0) + 1
            elif r.kind == REC_SUMMARY:
                in_use, sockets = r.probes, r.a
        if len(view.port_range) == 2:
            ports[netns] = EphemeralPorts(in_use, view.port_range[0], view.port_range[1], sockets)
        count, limit = view.conntrack
        if count and limit:
            ct[netns] = Conntrack(count[0], limit[0])
    return listeners, zero, ports, ct


class SaturationSource(ObjectSource):
    name = "sat"

    def __init__(self, config: SatConfig = SatConfig(), features: Optional[KernelFeatures] = None) -> None:
        self.config = config
        self.features = features or KernelFeatures.probe()
        self.obj: Optional[bpf.BpfObject] = None
        self._iter: Optional[bpf.Link] = None
        self._visitor: Optional[NetnsVisitor] = None
        self._choices: List[AttachChoice] = []
        self._lock = threading.Lock()
        self._snap = SatSnapshot()
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}
        self._entries: Dict[str, int] = {}
        self._ncpu = num_possible_cpus()
        self.iter_errors = 0
        self.namespaces_visited = 0
        self.keys_expired = 0  # kernel map keys of namespaces that no longer exist, deleted
        self.walks = 0
        self.walk_seconds = 0.0  # wall time of the last socket walk over every namespace
        self._pending: Optional["concurrent.futures.Future[Dict[int, NetnsView]]"] = None
        self._walk_started = float("-inf")
        self._views: Dict[int, NetnsView] = {}
        self._present: set = set()
        self._missing_before: set = set()

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        obj.map("drops").max_entries = self.config.drops_max_entries
        obj.map("sock_events").max_entries = self.config.sock_events_max_entries

    def start(self) -> None:
        self.obj, self._choices = load_with_fallback(bpf.object_path("saturation"), SIGNALS, self.features,
                                                     self._configure)
        try:
            self._iter = attach_iter(self.obj, ITER_PROGRAM)
            self._choices.append(AttachChoice("sockets", "iter/tcp", [ITER_PROGRAM], required=False))
        except bpf.BpfError as exc:
            self._choices.append(AttachChoice("sockets", None, [], [f"iter/tcp: {exc.strerror}"], required=False))
        self._visitor = NetnsVisitor()
        for ch in self._choices:
            log.info("sat: %s via %s (%s)", ch.signal, ch.chosen, ", ".join(ch.programs))

    def stop(self) -> None:
        if self._visitor:
            self._visitor.close()
            self._visitor = None
        self._iter = None  # destroyed with the object's links
        super().stop()

    # ---- sweeps --------------------------------------------------------------------------
    def _visit(self, _netns: int) -> NetnsView:
        """Runs in the visitor thread, inside the namespace: the port range first (the
        iterator counts the ports inside it), then the iterator, then conntrack."""
        ports = read_sysctl_ints(IPPORT_SYSCTL)
        records = b""
        if self._iter is not None and self.obj is not None:
            low, high = ports if len(ports) == 2 else (1, 0)  # unknown range: count nothing
            try:
                self.obj.map("iter_cfg").update_raw(bytes(ctypes.c_uint32(0)), bytes(SatIterCfg(low, high)))
                records = read_iter(self._iter)
            except bpf.BpfError:
                self.iter_errors += 1
        return NetnsView(records, ports, (read_sysctl_ints(CT_COUNT_SYSCTL), read_sysctl_ints(CT_MAX_SYSCTL)))

    def _percpu_sum(self, raw: bytes) -> int:
        return sum((ctypes.c_uint64 * self._ncpu).from_buffer_copy(raw[: 8 * self._ncpu]))

    def _collect_walk(self) -> bool:
        """Take the result of a finished socket walk and start the next one when due. Never
        waits: the sampled part of the snapshot is at most one walk interval old. True when a
        fresh, successful walk came in."""
        if self._visitor is None:
            return False
        fresh = False
        if self._pending is not None and self._pending.done():
            try:
                self._views = self._pending.result()
                self._present = set(self._visitor.listed)
                self.walks += 1
                self.walk_seconds = time.monotonic() - self._walk_started
                fresh = bool(self._views)
            except Exception:  # noqa: BLE001 - the last good walk stays, the failure is counted
                self.iter_errors += 1
                log.exception("sat: socket walk failed")
            self._pending = None
        now = time.monotonic()
        if self._pending is None and now - self._walk_started >= self.config.walk_interval_s:
            self._walk_started = now
            self._pending = self._visitor.submit(self._visit)
        return fresh

    def _gone(self, netns: int) -> bool:
        """A namespace missing from two visits in a row: its pods are gone, its keys go too
        (one miss could be a namespace created between the listing and the drop)."""
        return netns != 0 and netns in self._missing_before and netns not in self._present

    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        prune = self._collect_walk()  # prune dead namespaces' keys only right after a fresh walk
        views = self._views
        missing: set = set()
        drops: Dict[Tuple[int, int, str, str], int] = {}
        drops_map = self.obj.map("drops")
        for k, v in drops_map.items_raw():
            key = SatDropKey.from_buffer_copy(k)
            if prune and key.netns and key.netns not in self._present:
                missing.add(key.netns)
                if self._gone(key.netns):
                    drops_map.delete_raw(k)
                    self.keys_expired += 1
                    continue
            dk = (key.netns, key.cgroup_id, protocol_name(key.protocol), reason_name(key.reason))
            drops[dk] = drops.get(dk, 0) + self._percpu_sum(v)
        events: Dict[Tuple[int, int, str, str, str], int] = {}
        events_map = self.obj.map("sock_events")
        for k, v in events_map.items_raw():
            key = SatSockKey.from_buffer_copy(k)
            if prune and key.netns and key.netns not in self._present:
                missing.add(key.netns)
                if self._gone(key.netns):
                    events_map.delete_raw(k)
                    self.keys_expired += 1
                    continue
            ek = (key.netns, key.cgroup_id, format_addr(key.family, key.peer), KIND_NAMES.get(key.kind, "unknown"),
                  _detail(key.kind, key.detail))
            events[ek] = events.get(ek, 0) + self._percpu_sum(v)
        if prune:
            self._missing_before = missing
        listeners, zero, ports, ct = fold_records(views)
        sums = self.obj.map("counters").percpu_u64_sums()
        kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}
        with self._lock:
            self.namespaces_visited = len(views)
            self._kernel = kernel
            self._entries = {"sat_drops": len(drops), "sat_sock_events": len(events)}
            self._snap = SatSnapshot(drops, events, listeners, zero, ports, ct)

    # ---- views ---------------------------------------------------------------------------
    def snapshot(self) -> SatSnapshot:
        with self._lock:
            return self._snap

    def health(self) -> SourceHealth:
        with self._lock:
            k = dict(self._kernel)
            entries = dict(self._entries)
        k.update(iter_errors=self.iter_errors, namespaces_visited=self.namespaces_visited,
                 keys_expired=self.keys_expired, socket_walks=self.walks,
                 socket_walk_ms=int(self.walk_seconds * 1000),
                 netns_errors=self._visitor.errors if self._visitor else 0)
        return SourceHealth(
            events_read={},
            events_lost={"drops_full": k.get("drops_full", 0), "sock_events_full": k.get("events_full", 0),
                         "iter_write_failed": k.get("iter_write_failed", 0)},
            map_entries=entries,
            map_capacity={"sat_drops": self.config.drops_max_entries,
                          "sat_sock_events": self.config.sock_events_max_entries},
            kernel_counters=k,
        )
