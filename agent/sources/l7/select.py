"""Which L7 path runs: `--l7-source packets|syscalls|auto`, and the "http" area when both run.

packets:  PacketHttpSource (agent/sources/l7/packets.py) only — pod traffic, no process names.
syscalls: HttpSource (agent/sources/l7/http.py) only — every socket on the node, with process.
auto:     both; each pod veth the packet path attaches to is registered with the syscall
          path (`pkt_netns`), which then skips that pod's sockets unless their peer is
          loopback. Pod traffic is parsed from packets, what never crosses a pod veth
          (loopback inside a pod, hostNetwork pods, processes on a plain machine) from
          syscalls, and each request is counted once. One DnsTracker serves both.

BothHttpSource merges the two snapshots into one HttpSnapshot for exporter/prometheus/http.py.
Attach with fallbacks: if this kernel refuses the packet object (load or verifier), auto keeps
the syscall path for all traffic, logs why, and `meshlens check` shows it.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.base import AttachChoice, Source, SourceHealth
from meshlens.agent.sources.l7.dns import DnsSource, DnsTracker
from meshlens.agent.sources.l7.http import HttpConfig, HttpSnapshot, HttpSource, HttpStats
from meshlens.agent.sources.l7.packets import PacketHttpSource

L7_SOURCES = ("auto", "packets", "syscalls")

log = logging.getLogger("meshlens.http")


class BothHttpSource(Source):
    """The "http" area from the packet path and the syscall path together."""

    name = "http"

    def __init__(self, config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None) -> None:
        self.dns = DnsTracker()
        self.syscalls = HttpSource(config, features, self.dns)
        self.packets = PacketHttpSource(config, features, on_pod_netns=self.syscalls.cover_netns, dns=self.dns)
        self._parts: List[HttpSource] = [self.syscalls, self.packets]
        self._started: List[HttpSource] = []
        self._snapshot = HttpSnapshot({}, {}, 0, 0)
        self.packets_refused: Optional[str] = None  # why the kernel refused the packet path

    @property
    def obj(self) -> Optional[bpf.BpfObject]:
        return self.syscalls.obj

    def start(self) -> None:
        try:
            self.syscalls.start()   # first: the packet path registers pods with it
            self._started.append(self.syscalls)
        except Exception:
            self.stop()
            raise
        try:
            self.packets.start()
            self._started.append(self.packets)
        except Exception as exc:  # noqa: BLE001 - e.g. a verifier that rejects l7pkt.bpf.o here
            self.packets_refused = str(exc).splitlines()[0][:300]
            log.warning("http: packet path refused by this kernel (%s); syscalls parse all traffic",
                        self.packets_refused)
            self.packets.stop()
            self.syscalls.uncover_all()
            self._parts = [self.syscalls]

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
        sys_ = self.syscalls.attach_report()
        if self.packets_refused is not None:
            return [AttachChoice("l7_pod_traffic", "syscalls (all traffic)",
                                 [p for c in sys_ if c.signal == "l7_payload" for p in c.programs],
                                 tried=[f"packets: {self.packets_refused}"]),
                    AttachChoice("l7_other_traffic", "syscalls (loopback, hostNetwork, no pod veth)",
                                 [p for c in sys_ if c.signal == "l7_payload" for p in c.programs])] + sys_
        pkt = self.packets.attach_report()
        out = [AttachChoice("l7_pod_traffic", "packets (tc on pod veths)" if pkt else "",
                            [p for c in pkt if c.signal == "l7_payload" for p in c.programs]),
               AttachChoice("l7_other_traffic", "syscalls (loopback, hostNetwork, no pod veth)" if sys_ else "",
                            [p for c in sys_ if c.signal == "l7_payload" for p in c.programs])]
        return out + pkt + sys_


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
