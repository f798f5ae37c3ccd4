"""tc source: per-pod traffic seen at each pod's host-side veth (bpf/tc.bpf.c).

link notifications (agent/sources/tc/link_watch.py) -> attach ingress/egress programs (agent/sources/tc/attach.py)
-> kernel maps `ifstats`, `rtt`, `drops`, `counters` -> sweep (this module) -> TcSnapshot ->
exporter/prometheus/tc.py. The snapshot maps every interface to its name and its peer's network
namespace inode, which the identity layer turns into a pod.

Every attached interface gets a counter slot (agent/sources/tc/slots.py): an entry pair of
the per-CPU array `if_slots`, zeroed before use, whose number is the classid of the
interface's filters. An interface that finds the table full is counted in the `ifstats`
hash instead (health: `interfaces_without_slot`, `unslotted_packets`). When an
interface goes away its slot's last values are kept as its final counters and the slot is
free for the next interface.

Drops come from the optional skb:kfree_skb tracepoint program (see bpf/tc.bpf.c); without it
the source still counts traffic and the attach report says drops are unavailable.

With a TcChain (agent/sources/tc/chain.py) shared with the packet L7 source, the counter
programs tail-call the L7 parser: one filter per hook.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import Signal, Variant, load_with_fallback
from meshlens.agent.kernel.drop_reasons import reason_name
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.kernel.libbpf import num_possible_cpus
from meshlens.agent.sources.tc.link_watch import LinkInfo, LinkWatcher, NetnsResolver
from meshlens.agent.sources.base import FOLDED_PEER, AttachChoice, ObjectSource, SourceHealth
from meshlens.agent.sources.tc.attach import TcAttacher, remove_stale_filters
from meshlens.agent.sources.tc.chain import TcChain
from meshlens.agent.sources.tc.slots import SlotTable, entry_index
from meshlens.agent.sources.tc.structs import (
    COUNTER_NAMES,
    DIRECTION_NAMES,
    PARSE_FAILURE_REASONS,
    ROLE_NAMES,
    SIDE_HOST,
    SIDE_NAMES,
    SIDE_POD,
    TcDev,
    TcDevKey,
    TcDropKey,
    TcIfKey,
    TcIfStats,
    TcRttHist,
    TcRttKey,
    TcSyn,
    format_addr,
    percpu_values,
    sum_structs,
)

log = logging.getLogger("meshlens.tc")

SIGNALS = (
    Signal("tc_drops", (Variant("tracepoint", "tracepoint", ("handle_tc_kfree_skb",), ("skb/kfree_skb",)),),
           required=False),
)
PROGRAMS = {"ingress": "meshlens_tc_in", "egress": "meshlens_tc_eg"}
STAT_FIELDS = ("packets", "bytes", "segs", "tcp_syn", "tcp_synack", "tcp_fin", "tcp_rst", "parse_failures")


@dataclass(frozen=True)
class TcConfig:
    interface_slots: int = 1024          # interfaces counted in `if_slots` (128 bytes per CPU each)
    ifstats_max_entries: int = 512       # interfaces beyond the slots: 2 entries each
    syns_max_entries: int = 16384
    rtt_max_entries: int = 4096
    drops_max_entries: int = 4096
    tracked_max_entries: int = 8192
    syn_timeout_s: float = 10.0          # unanswered SYNs leave the `syns` map after this
    main_interface: Optional[str] = None  # also watch the node's main interface (by name)
    forget_after_s: float = 0.0           # keep a removed interface's last numbers this long
    # handshake-RTT series keep this many external peer addresses per interface and role;
    # the rest are summed into one peer named "external" (0 = no cap)
    max_peers_per_interface: int = 0


@dataclass(frozen=True)
class InterfaceInfo:
    ifindex: int
    name: str
    kind: str            # pod_veth | main
    peer_ifindex: int
    peer_netns: int      # inode of the pod's network namespace (0: unknown)
    attached: bool
    error: str = ""
    slot: int = 0        # its counter slot (0: none, counted in the `ifstats` hash)


@dataclass(frozen=True)
class IfCounters:
    packets: int = 0
    bytes: int = 0
    segs: int = 0
    tcp_syn: int = 0
    tcp_synack: int = 0
    tcp_fin: int = 0
    tcp_rst: int = 0
    parse_failures: int = 0


@dataclass(frozen=True)
class RttSeries:
    slots: Tuple[int, ...]   # log2 µs slots (see tc_structs.rtt_bucket_bounds)
    count: int
    sum_s: float


@dataclass(frozen=True)
class TcSnapshot:
    interfaces: Dict[int, InterfaceInfo]
    counters: Dict[Tuple[int, str], IfCounters]       # (ifindex, direction)
    rtt: Dict[Tuple[int, str, str], RttSeries]        # (ifindex, role, peer address)
    drops: Dict[Tuple[int, str, str], int]            # (ifindex, side, reason)
    parse_failures: Dict[str, int]                    # reason -> count (all interfaces)
    syns_expired: int = 0
    peers_folded: int = 0                             # peer addresses summed into "external" now


class TcSource(ObjectSource):
    name = "tc"

    def __init__(self, config: TcConfig = TcConfig(), features: Optional[KernelFeatures] = None,
                 watch: bool = True, is_external: Callable[[str], bool] = lambda address: True,
                 chain: Optional[TcChain] = None) -> None:
        self.config = config
        self.chain = chain
        self._slots = SlotTable(config.interface_slots)
        self._final: Dict[Tuple[int, str], IfCounters] = {}   # counters of removed slotted interfaces
        self._unslotted = 0        # packets counted in the `ifstats` hash (interfaces without a slot)
        self._unslotted_gone = 0   # ... of which on interfaces since forgotten
        self.is_external = is_external
        self._rtt_kept: Dict[Tuple[int, str], Set[str]] = {}   # (ifindex, role) -> peers kept by address
        self.features = features or KernelFeatures.probe()
        self.watch = watch
        self.obj: Optional[bpf.BpfObject] = None
        self.attacher: Optional[TcAttacher] = None
        self.watcher: Optional[LinkWatcher] = None
        self.resolver = NetnsResolver()
        self._choices: List[AttachChoice] = []
        self._lock = threading.Lock()
        self._interfaces: Dict[int, InterfaceInfo] = {}
        self._removed: Dict[int, float] = {}   # ifindex -> monotonic time it went away
        self._snap = TcSnapshot({}, {}, {}, {}, {})
        self._peers_folded = 0
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}
        self._entries: Dict[str, int] = {}
        self.attach_errors = 0
        self.syns_expired = 0
        self.stale_filters_removed = 0
        self._own_netns = os.stat("/proc/self/ns/net").st_ino
        self._ncpu = num_possible_cpus()

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        c = self.config
        obj.map("if_slots").max_entries = 2 * c.interface_slots
        for name, n in (("ifstats", c.ifstats_max_entries), ("syns", c.syns_max_entries), ("rtt", c.rtt_max_entries),
                        ("drops", c.drops_max_entries), ("tracked", c.tracked_max_entries)):
            obj.map(name).max_entries = n

    def start(self) -> None:
        self.obj, self._choices = load_with_fallback(bpf.object_path("tc"), SIGNALS, self.features, self._configure)
        fds = {d: self.obj.program(p).fd for d, p in PROGRAMS.items()}
        self.attacher = TcAttacher(fds)
        # a crashed agent's filters (their program held by no live process) go before ours attach
        self.stale_filters_removed += len(remove_stale_filters())
        self._choices.append(AttachChoice("tc_traffic", "clsact", list(PROGRAMS.values())))
        if self.chain:
            self.chain.offer_array(self.obj.map("l7_progs"))
        if self.watch:
            self.watcher = LinkWatcher(self.link_up, self.link_gone, self.config.main_interface)
            self.watcher.start()
            self.watcher.ready.wait(10)
        for ch in self._choices:
            log.info("tc: %s via %s (%s)", ch.signal, ch.chosen, ", ".join(ch.programs))

    def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()
            self.watcher = None
        if self.chain:
            self.chain.withdraw_array()
        if self.attacher:
            self.attacher.detach_all()
            self.attacher = None
        super().stop()

    # ---- links (called from the watcher thread) ------------------------------------------
    def link_up(self, link: LinkInfo) -> None:
        """Attach to a new link, then learn who is behind it and register it for drops."""
        if not self.attacher or not self.obj:
            return
        error = ""
        slot = self._take_slot(link)
        try:
            self.attacher.attach(link.ifindex, link.name, classid=slot or None)
        except Exception as exc:  # noqa: BLE001 - counted and reported per interface
            self.attach_errors += 1
            error = str(exc)
            log.warning("tc: cannot attach to %s: %s", link.name, exc)
            with self._lock:
                self._slots.release(link.ifindex)
            slot = 0
        peer_netns = self.resolver.resolve(link.peer_netnsid) if link.peer_netnsid >= 0 else 0
        self._track(TcDevKey(self._own_netns, link.ifindex), TcDev(link.ifindex, SIDE_HOST))
        if peer_netns and link.peer_ifindex:
            self._track(TcDevKey(peer_netns, link.peer_ifindex), TcDev(link.ifindex, SIDE_POD))
        info = InterfaceInfo(link.ifindex, link.name, link.kind, link.peer_ifindex, peer_netns, not error, error, slot)
        with self._lock:
            self._interfaces[link.ifindex] = info
            self._removed.pop(link.ifindex, None)
        if self.chain:   # a chained L7 parser runs only where these filters are
            self.chain.interface_attached(link.ifindex, not error)
        log.info("tc: %s %s (ifindex %d, peer netns %d)", "attached to" if not error else "tracking",
                 link.name, link.ifindex, peer_netns)

    def link_gone(self, ifindex: int) -> None:
        if self.attacher:
            self.attacher.forget(ifindex)
        if self.chain:
            self.chain.interface_gone(ifindex)
        with self._lock:
            slot = self._slots.release(ifindex)
            if slot and self.obj:
                # the link is unregistered: its filters ran their last; these are its totals
                for direction, name in DIRECTION_NAMES.items():
                    self._final[(ifindex, name)] = self._read_entry(entry_index(slot, direction))
            info = self._interfaces.get(ifindex)
            if info is None:
                return
            self._removed[ifindex] = time.monotonic()
        self._untrack(ifindex)

    # ---- counter slots -------------------------------------------------------------------
    def _take_slot(self, link: LinkInfo) -> int:
        """The link's slot (0: none free); a newly taken slot is zeroed before any filter
        carries its number, so nothing of its previous interface is carried over."""
        with self._lock:
            served = self._interfaces.get(link.ifindex)
            if served is not None and link.ifindex not in self._removed:
                return served.slot  # a repeated notification for a link we already serve
            slot = self._slots.assign(link.ifindex)
            if slot is None:
                log.warning("tc: no counter slot free for %s (all %d in use): counted in the ifstats hash",
                            link.name, self._slots.size)
                return 0
            self._final.pop((link.ifindex, "ingress"), None)
            self._final.pop((link.ifindex, "egress"), None)
            zero = bytes((self.obj.map("if_slots").value_size + 7) // 8 * 8 * self._ncpu)
            for direction in DIRECTION_NAMES:
                self.obj.map("if_slots").update_raw(bytes(ctypes.c_uint32(entry_index(slot, direction))), zero)
            return slot

    def _read_entry(self, index: int) -> IfCounters:
        raw = self.obj.map("if_slots").lookup_raw(bytes(ctypes.c_uint32(index)))
        s = sum_structs(percpu_values(raw, TcIfStats, self._ncpu), TcIfStats) if raw else TcIfStats()
        return IfCounters(**{f: getattr(s, f) for f in STAT_FIELDS})

    def _track(self, key: TcDevKey, dev: TcDev) -> None:
        try:
            self.obj.map("tracked").update_raw(bytes(key), bytes(dev))
        except bpf.BpfError as exc:
            log.warning("tc: tracked map: %s", exc)

    def _untrack(self, ifindex: int) -> None:
        if not self.obj:
            return
        m = self.obj.map("tracked")
        for k, v in m.items_raw():
            if TcDev.from_buffer_copy(v).host_ifindex == ifindex:
                m.delete_raw(k)

    # ---- sweeps --------------------------------------------------------------------------
    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        now = time.monotonic()
        with self._lock:
            gone = {i for i, t in self._removed.items() if now - t >= self.config.forget_after_s}
        counters: Dict[Tuple[int, str], IfCounters] = {}
        with self._lock:
            for ifindex, slot in self._slots.in_use().items():
                for direction, name in DIRECTION_NAMES.items():
                    counters[(ifindex, name)] = self._read_entry(entry_index(slot, direction))
            for key_, c in list(self._final.items()):
                if key_[0] in gone:
                    del self._final[key_]
                else:
                    counters[key_] = c
        ifstats = self.obj.map("ifstats")
        unslotted = self._unslotted_gone
        hashed = 0
        for k, v in ifstats.items_raw():
            hashed += 1
            key = TcIfKey.from_buffer_copy(k)
            s = sum_structs(percpu_values(v, TcIfStats, self._ncpu), TcIfStats)
            unslotted += s.packets
            if key.ifindex in gone:
                ifstats.delete_raw(k)
                self._unslotted_gone += s.packets
                continue
            ck = (key.ifindex, DIRECTION_NAMES.get(key.direction, "unknown"))
            prev = counters.get(ck, IfCounters())  # a slotted interface has no entry here; never lose one
            counters[ck] = IfCounters(**{f: getattr(s, f) + getattr(prev, f) for f in STAT_FIELDS})
        rtt: Dict[Tuple[int, str, str], RttSeries] = {}
        rtt_map = self.obj.map("rtt")
        for k, v in rtt_map.items_raw():
            key = TcRttKey.from_buffer_copy(k)
            if key.ifindex in gone:
                rtt_map.delete_raw(k)
                continue
            h = sum_structs(percpu_values(v, TcRttHist, self._ncpu), TcRttHist)
            rk = self._rtt_key(key.ifindex, ROLE_NAMES.get(key.role, "unknown"), format_addr(key.family, key.peer))
            series = RttSeries(tuple(h.slots), h.count, h.sum_ns / 1e9)
            prev = rtt.get(rk)
            rtt[rk] = series if prev is None else RttSeries(
                tuple(a + b for a, b in zip(prev.slots, series.slots)), prev.count + series.count, prev.sum_s + series.sum_s)
        self._rtt_kept = {k: v for k, v in self._rtt_kept.items() if k[0] not in gone}
        peers_folded = self._peers_folded
        self._peers_folded = 0
        drops: Dict[Tuple[int, str, str], int] = {}
        drops_map = self.obj.map("drops")
        for k, v in drops_map.items_raw():
            key = TcDropKey.from_buffer_copy(k)
            if key.ifindex in gone:
                drops_map.delete_raw(k)
                continue
            n = sum((ctypes.c_uint64 * self._ncpu).from_buffer_copy(v[: 8 * self._ncpu]))
            dk = (key.ifindex, SIDE_NAMES.get(key.side, "unknown"), reason_name(key.reason))
            drops[dk] = drops.get(dk, 0) + n
        self._expire_syns(now_ns)
        sums = self.obj.map("counters").percpu_u64_sums()
        kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}
        with self._lock:
            for i in gone:
                self._interfaces.pop(i, None)
                self._removed.pop(i, None)
            interfaces = dict(self._interfaces)
            self._kernel = kernel
            self._unslotted = unslotted
            self._entries = {"tc_ifstats": hashed, "tc_rtt": len(rtt), "tc_drops": len(drops),
                             "tc_syns": self._entries.get("tc_syns", 0)}
            self._snap = TcSnapshot(
                interfaces=interfaces,
                counters=counters,
                rtt=rtt,
                drops=drops,
                parse_failures={r: kernel.get(r, 0) for r in PARSE_FAILURE_REASONS},
                syns_expired=self.syns_expired,
                peers_folded=peers_folded,
            )

    def _expire_syns(self, now_ns: int) -> None:
        """Delete SYNs never answered within syn_timeout_s (the map is not an LRU)."""
        syns = self.obj.map("syns")
        limit = int(self.config.syn_timeout_s * 1e9)
        mono_ns = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
        items = syns.items_raw()
        for k, v in items:
            if mono_ns - TcSyn.from_buffer_copy(v).ts_ns > limit and syns.delete_raw(k):
                self.syns_expired += 1
        self._entries["tc_syns"] = len(items)

    # ---- views ---------------------------------------------------------------------------
    def _rtt_key(self, ifindex: int, role: str, peer: str) -> Tuple[int, str, str]:
        """The series a kernel RTT entry is reported in: its own while the interface keeps
        fewer than max_peers_per_interface external peers (first come, kept while the
        kernel entry lives), else the interface's "external" peer (counted)."""
        cap = self.config.max_peers_per_interface
        if not cap:
            return ifindex, role, peer
        kept = self._rtt_kept.setdefault((ifindex, role), set())
        if peer in kept:
            return ifindex, role, peer
        if len(kept) < cap or not self.is_external(peer):
            kept.add(peer)
            return ifindex, role, peer
        self._peers_folded += 1
        return ifindex, role, FOLDED_PEER

    def snapshot(self) -> TcSnapshot:
        with self._lock:
            return self._snap

    def interfaces(self) -> Dict[int, InterfaceInfo]:
        with self._lock:
            return dict(self._interfaces)

    def health(self) -> SourceHealth:
        with self._lock:
            k = dict(self._kernel)
            entries = dict(self._entries)
        c = self.config
        with self._lock:
            slots_in_use = len(self._slots.in_use())
            without = sum(1 for i in self._interfaces.values()
                          if i.attached and not i.slot and i.ifindex not in self._removed)
            unslotted = self._unslotted
        k.update(attach_errors=self.attach_errors, syns_expired=self.syns_expired,
                 stale_filters_removed=self.stale_filters_removed, interfaces_without_slot=without,
                 unslotted_packets=unslotted,
                 link_callback_errors=self.watcher.callback_errors if self.watcher else 0)
        return SourceHealth(
            events_read={},
            events_lost={"ifstats_full": k.get("ifstats_full", 0), "syns_full": k.get("syns_full", 0),
                         "rtt_full": k.get("rtt_full", 0), "drops_full": k.get("drops_full", 0)},
            map_entries={**entries, "tc_if_slots": slots_in_use},
            map_capacity={"tc_if_slots": c.interface_slots, "tc_ifstats": c.ifstats_max_entries,
                          "tc_syns": c.syns_max_entries, "tc_rtt": c.rtt_max_entries, "tc_drops": c.drops_max_entries},
            kernel_counters=k,
            callback_errors=self.watcher.callback_errors if self.watcher else 0,
        )
