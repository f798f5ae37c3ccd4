"""Which L7 path runs: `--l7-source packets|syscalls|auto`, and the "http" area when several run.

packets:  PacketHttpSource (agent/sources/l7/packets.py) only — pod traffic, no process names.
syscalls: HttpSource (agent/sources/l7/http.py) only — every socket on the node, with process.
auto:     packets at pod veths (tc) + CgroupHttpSource (agent/sources/l7/cgroup.py, cgroup_skb
          on the cgroup v2 root) for what never crosses a pod veth (loopback inside a pod,
          hostNetwork pods, processes on a plain machine, host process <-> pod), and no
          syscalls:* tracepoint at all. Each pod veth the packet path attaches to is
          registered with the other path (`pkt_netns`), which then skips that pod's sockets
          unless the packet stays on loopback, so each request is counted once per side.
          One DnsTracker serves all paths.

Attach with fallbacks: if this kernel refuses the cgroup_skb object, auto keeps the syscall
path for the other traffic (which then pays the syscalls:* slow path); if it refuses the tc
packet object, the other path (cgroup_skb, or syscalls) parses pod traffic too. Either is
logged and `meshlens check` shows it (`http/l7_pod_traffic`, `http/l7_other_traffic`).
BothHttpSource merges the snapshots into one HttpSnapshot for exporter/prometheus/http.py.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.base import AttachChoice, Source, SourceHealth
from meshlens.agent.sources.l7.cgroup import CHOSEN as CGROUP_CHOSEN, CgroupHttpSource, socket_hook_reasons
from meshlens.agent.sources.l7.dns import DnsSource, DnsTracker
from meshlens.agent.sources.l7.http import HttpConfig, HttpSnapshot, HttpSource, HttpStats
from meshlens.agent.sources.l7.packets import PacketHttpSource

L7_SOURCES = ("auto", "packets", "syscalls")
SYSCALLS_CHOSEN = "syscalls (loopback, hostNetwork, no pod veth)"

log = logging.getLogger("meshlens.http")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


class BothHttpSource(Source):
    """The "http" area from the packet path at pod veths and one path for the other traffic."""

    name = "http"

    def __init__(self, config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None,
                 cgroup_root: Optional[str] = None) -> None:
        self.dns = DnsTracker()
        self.features = features or KernelFeatures.probe()
        self.cgroup = CgroupHttpSource(config, self.features, self.dns, cgroup_root)
        self.syscalls = HttpSource(config, self.features, self.dns)   # started only if cgroup_skb is refused
        self.packets = PacketHttpSource(config, self.features, on_pod_netns=self._cover, dns=self.dns)
        self.other: HttpSource = self.cgroup
        self._parts: List[HttpSource] = [self.cgroup, self.packets]
        self._started: List[HttpSource] = []
        self._snapshot = HttpSnapshot({}, {}, 0, 0)
        self.cgroup_refused: Optional[str] = None   # why the kernel refused the cgroup_skb path
        self.packets_refused: Optional[str] = None  # why the kernel refused the packet path

    def _cover(self, netns: int, covered: bool) -> None:
        """A pod veth the packet path parses (or no longer parses): the other path skips (or
        follows again) that pod's non-loopback traffic. Both candidates keep the set, so the
        one started later (a fallback) starts with it."""
        self.cgroup.cover_netns(netns, covered)
        self.syscalls.cover_netns(netns, covered)

    @property
    def obj(self) -> Optional[bpf.BpfObject]:
        return self._started[0].obj if self._started else None

    def start(self) -> None:
        try:
            self.cgroup.start()   # first: the packet path registers pods with it
            self._started.append(self.cgroup)
        except Exception as exc:  # noqa: BLE001 - e.g. a verifier that rejects l7cg.bpf.o here
            self.cgroup_refused = _first_line(exc)
            log.warning("http: cgroup_skb path refused by this kernel (%s); syscalls parse the traffic "
                        "no pod veth carries", self.cgroup_refused)
            self.cgroup.stop()
            self.other = self.syscalls
            try:
                self.syscalls.start()
            except Exception:
                self.stop()
                raise
            self._started.append(self.syscalls)
        if self.other is self.cgroup:
            # one pkt_conns for both entry points (~28 MB at the default size, not twice): their
            # keys never meet (tc keys carry the veth's ifindex, cgroup_skb keys the socket's
            # netns inode; a socket tc parses is skipped by cgroup_skb before any map is read)
            self.packets.shared_conns = self.cgroup.obj.map("pkt_conns") if self.cgroup.obj else None
        try:
            try:
                self.packets.start()
            except Exception as exc:  # noqa: BLE001 - the shared table refused: each its own
                if self.packets.shared_conns is None:
                    raise
                log.warning("http: the packet path cannot share cgroup_skb's pkt_conns (%s); it loads its own",
                            _first_line(exc))
                self.packets.stop()
                self.packets.shared_conns = None
                self.packets.start()
            self._started.append(self.packets)
        except Exception as exc:  # noqa: BLE001 - e.g. a verifier that rejects l7pkt.bpf.o here
            self.packets_refused = _first_line(exc)
            log.warning("http: packet path refused by this kernel (%s); %s parses all traffic",
                        self.packets_refused, "cgroup_skb" if self.other is self.cgroup else "syscalls")
            self.packets.stop()
            self.other.uncover_all()
        self._parts = list(self._started)

    def stop(self) -> None:
        while self._started:
            self._started.pop().stop()

    def ring_buffers(self) -> List[bpf.RingBuffer]:
        return [rb for p in self._parts for rb in p.ring_buffers()]

    def sweep(self, now_ns: int) -> None:
        for p in self._started:
            p.sweep(now_ns)
        snaps = [p.snapshot() for p in self._started]
        series: Dict = {}
        for snap in snaps:
            for k, st in snap.series.items():
                mine = series.get(k)
                if mine is None:
                    series[k] = st
                else:
                    merged = HttpStats()
                    merged.merge(mine)
                    merged.merge(st)
                    series[k] = merged
        errors: Dict[str, int] = {}
        for snap in snaps:
            for n, v in snap.parse_errors.items():
                errors[n] = errors.get(n, 0) + v
        self._snapshot = HttpSnapshot(
            series=series,
            parse_errors=errors,
            route_overflows=sum(s.route_overflows for s in snaps),
            overflow_records=sum(s.overflow_records for s in snaps),
            tap=tuple(t for s in snaps for t in s.tap),
            tap_dropped=sum(s.tap_dropped for s in snaps),
        )

    def set_tap_sampling(self, every: int) -> None:
        """The tap switch of both paths (each object has its own `tap_ctl` map)."""
        for p in self._started:
            p.set_tap_sampling(every)

    def snapshot(self) -> HttpSnapshot:
        return self._snapshot

    def kernel_counters(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for p in self._parts:
            for n, v in p.kernel_counters().items():
                out[n] = out.get(n, 0) + v
        return out

    def health(self) -> SourceHealth:
        hs = [p.health() for p in self._parts]

        def add(dicts: List[Dict[str, int]]) -> Dict[str, int]:
            out: Dict[str, int] = {}
            for d in dicts:
                for n, v in d.items():
                    out[n] = out.get(n, 0) + v
            return out

        entries = dict(hs[0].map_entries)
        for h in hs[1:]:
            entries.update({f"pkt_{n}" if n in entries else n: v for n, v in h.map_entries.items()})
        return SourceHealth(
            events_read=add([h.events_read for h in hs]),
            events_lost=add([h.events_lost for h in hs]),
            map_entries=entries,
            map_capacity=dict(hs[0].map_capacity),
            kernel_counters=add([h.kernel_counters for h in hs]),
            callback_errors=sum(h.callback_errors for h in hs),
        )

    def attach_report(self) -> List[AttachChoice]:
        """Which path each kind of traffic takes (shown by `meshlens check`)."""
        other = self.other.attach_report()
        other_progs = [p for c in other if c.signal == "l7_payload" for p in c.programs]
        tried = socket_hook_reasons(self.features)
        if self.other is self.cgroup:
            other_name = CGROUP_CHOSEN
        else:
            other_name = SYSCALLS_CHOSEN
            tried.append(f"cgroup_skb: {self.cgroup_refused}")
        if self.packets_refused is not None:
            pod = AttachChoice("l7_pod_traffic", f"{other_name.split(' (')[0]} (all traffic)", other_progs,
                               tried=[f"packets: {self.packets_refused}"])
            return [pod, AttachChoice("l7_other_traffic", other_name, other_progs, tried=tried)] + other
        pkt = self.packets.attach_report()
        out = [AttachChoice("l7_pod_traffic", "packets (tc on pod veths)" if pkt else "",
                            [p for c in pkt if c.signal == "l7_payload" for p in c.programs]),
               AttachChoice("l7_other_traffic", other_name if other else "", other_progs, tried=tried)]
        return out + pkt + other


def l7_sources_for(mode: str, config: HttpConfig = HttpConfig(),
                   features: Optional[KernelFeatures] = None) -> List[Source]:
    """The "http" source and its "dns" view for --l7-source `mode`."""
    if mode not in L7_SOURCES:
        raise ValueError(f"--l7-source: {mode!r} is not one of {', '.join(L7_SOURCES)}")
    if mode == "syscalls":
        http: Source = HttpSource(config, features)
    elif mode == "packets":
        http = PacketHttpSource(config, features)
    else:
        http = BothHttpSource(config, features)
    return [http, DnsSource(http)]
