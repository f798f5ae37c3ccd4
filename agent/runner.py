"""The agent's main loop: start the sources, poll their ring buffers, sweep their maps on a
timer, and build AgentSnapshots for the exporter. One thread owns all kernel reading; the
exporter's threads only call snapshot().

Sources are listed once, in `default_sources()`.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import psutil

from meshlens.agent.identity.cgroups import CgroupResolver
from meshlens.agent.identity.model import IdentityView, StandaloneIdentity
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.aggregate.flows import FlowTable
from meshlens.agent.aggregate.history import DEFAULT_INTERVAL_S, DEFAULT_LENGTH, SnapshotHistory
from meshlens.agent.aggregate.service_map import ServiceMap
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.sources.base import Source
from meshlens.agent.sources.tcp.source import TcpConfig, TcpSource
from meshlens.agent.sources.tc.chain import TcChain
from meshlens.agent.sources.tc.source import TcConfig, TcSource
from meshlens.agent.sources.l7.http import HttpConfig
from meshlens.agent.sources.l7.select import l7_sources_for
from meshlens.agent.sources.saturation.source import SatConfig, SaturationSource
from meshlens.agent.aggregate.saturation import summarize

log = logging.getLogger("meshlens.runner")


@dataclass(frozen=True)
class AgentConfig:
    sweep_interval_s: float = 1.0
    poll_timeout_ms: int = 100
    consume_budget: int = 4096        # ring-buffer records per buffer per step: a flood waits for the sweep
    tcp: TcpConfig = TcpConfig()
    http: HttpConfig = HttpConfig()
    sat: SatConfig = SatConfig()
    features: Tuple[str, ...] = ("l4", "l7", "tc", "sat")  # which capture layers run (l4 always)
    l7_source: str = "auto"        # packets | syscalls | auto (agent/sources/l7/select.py)
    map_interval_s: float = 5.0    # how often the service map records edge totals
    map_window_s: float = 60.0     # the window its rates and percentiles cover
    history_interval_s: float = DEFAULT_INTERVAL_S  # how often a snapshot goes into the history ring
    history_len: int = DEFAULT_LENGTH               # records kept (default: one minute at 5 s)


FEATURES = ("l4", "l7", "tc", "sat")


def default_sources(config: AgentConfig, features: KernelFeatures,
                    identity: Optional[IdentityView] = None) -> List[Source]:
    """The sources for the configured features, in start order. L4 always runs: the flow
    table, the service map and the agent's health build on it. `identity` tells the flow
    table which peers are external (only those are folded per workload)."""
    view = identity or StandaloneIdentity()

    def is_external(address: str) -> bool:
        return view.peer(address).owner_kind == "external"

    flows = FlowTable(config.tcp.max_rollups, config.tcp.rollup_ttl_s,
                      max_peers_per_workload=config.tcp.max_peers_per_workload, is_external=is_external,
                      rerank_s=config.tcp.peer_rerank_s)
    sources: List[Source] = [TcpSource(flows, config.tcp, features)]
    # the packet L7 parser runs from the tc counter programs when both run: one filter per hook
    chain: Optional[TcChain] = None
    if "l7" in config.features:
        l7 = l7_sources_for(config.l7_source, config.http, features)
        for s in l7:
            packets = getattr(s, "packets", s)   # BothHttpSource holds its PacketHttpSource
            if "tc" in config.features and hasattr(packets, "use_tc_chain"):
                chain = TcChain()
                packets.use_tc_chain(chain)
        sources += l7
    if "tc" in config.features:
        sources.append(TcSource(TcConfig(max_peers_per_interface=config.tcp.max_peers_per_workload), features,
                                is_external=is_external, chain=chain))
    if "sat" in config.features:
        sources.append(SaturationSource(config.sat, features))
    return sources


class Agent:
    def __init__(self, config: AgentConfig = AgentConfig(), sources: Optional[List[Source]] = None,
                 features: Optional[KernelFeatures] = None, identity: Optional[IdentityView] = None,
                 watch_status: Callable[[], Dict[str, object]] = dict) -> None:
        self.config = config
        self.features = features or KernelFeatures.probe()
        self.identity: IdentityView = identity or StandaloneIdentity()
        self.sources = sources if sources is not None else default_sources(config, self.features, self.identity)
        # one cgroup cache for naming and identity
        self.cgroups: CgroupResolver = getattr(self.identity, "cgroups", None) or CgroupResolver()
        self._watch_status = watch_status
        self.service_map = ServiceMap(config.map_window_s, identity=self.identity)
        self._last_map = float("-inf")
        self.history = SnapshotHistory(config.history_interval_s, config.history_len)
        self.started_wall = time.time()
        self._tap_clients = 0
        self._tap_lock = threading.Lock()
        self._epoll: Optional[select.epoll] = None
        self._ready: Dict[int, object] = {}
        self.sweeps = 0
        self._started: List[Source] = []
        self._proc = psutil.Process()
        self._lock = threading.Lock()

    def start(self) -> None:
        try:
            for s in self.sources:
                s.start()
                self._started.append(s)
        except Exception:
            self.stop()
            raise
        # the service map's first record is the moment the agent started: a window then
        # covers every request since, not only those after the first timed observation
        self.observe_service_map()

    def stop(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        while self._started:
            s = self._started.pop()
            try:
                s.stop()
            except Exception:  # noqa: BLE001 - keep detaching the others
                log.exception("stopping source %s", s.name)

    def _poller(self) -> "select.epoll":
        """One epoll over every source's ring buffer, so a busy buffer is never kept waiting
        behind an idle one."""
        if self._epoll is None:
            self._epoll = select.epoll()
            self._ready = {}
            for s in self._started:
                for rb in s.ring_buffers():
                    fd = rb.epoll_fd()
                    self._epoll.register(fd, select.EPOLLIN)
                    self._ready[fd] = rb
        return self._epoll

    def step(self, now: float, last_sweep: float) -> float:
        """Wait for ring-buffer records (up to the poll timeout) and consume the ready
        buffers; sweep if due. Returns the time of the last sweep."""
        try:
            events = self._poller().poll(self.config.poll_timeout_ms / 1000)
        except InterruptedError:
            events = []
        for fd, _ in events:
            self._ready[fd].consume(self.config.consume_budget)
        if now - last_sweep >= self.config.sweep_interval_s:
            self.sweep()
            if now - self._last_map >= self.config.map_interval_s:
                self.observe_service_map()
                self._last_map = now
            if self.history.due(now):
                with self._lock:
                    areas = {s.name: s.snapshot() for s in self._started}
                self.history.record(areas)
            return now
        return last_sweep

    def observe_service_map(self) -> None:
        with self._lock:
            areas = {s.name: s.snapshot() for s in self._started}
        self.service_map.observe(areas)

    def sweep(self) -> None:
        now_ns = time.monotonic_ns()
        with self._lock:
            for s in self._started:
                s.sweep(now_ns)
            self.sweeps += 1

    def area(self, name: str) -> object:
        """One source's current snapshot, without building the whole AgentSnapshot (the tap
        polls the HTTP area ten times a second; copying 10k flow rollups each time would not do)."""
        with self._lock:
            for s in self._started:
                if s.name == name:
                    return s.snapshot()
        return None

    # ---- the tap: kernel sampling only while someone watches ------------------------------
    def tap_open(self, every: int = 1) -> bool:
        """A tap client connected: the first one turns request sampling on in the kernel.
        False when no source can sample (L7 not running)."""
        sources = [s for s in self._started if hasattr(s, "set_tap_sampling")]
        with self._tap_lock:
            self._tap_clients += 1
            if self._tap_clients == 1:
                for s in sources:
                    s.set_tap_sampling(every)  # type: ignore[attr-defined]
        return bool(sources)

    def tap_close(self) -> None:
        """A tap client went away: the last one turns sampling off again."""
        with self._tap_lock:
            self._tap_clients = max(0, self._tap_clients - 1)
            if self._tap_clients == 0:
                for s in self._started:
                    if hasattr(s, "set_tap_sampling"):
                        s.set_tap_sampling(0)  # type: ignore[attr-defined]

    @property
    def tap_clients(self) -> int:
        return self._tap_clients

    def run(self, stop: threading.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            last = self.step(time.monotonic(), last)
        self.sweep()  # last numbers before detaching

    def snapshot(self) -> AgentSnapshot:
        cpu = self._proc.cpu_times()
        with self._lock:
            areas = {s.name: s.snapshot() for s in self._started}
            return AgentSnapshot(
                areas=areas,
                health={s.name: s.health() for s in self._started},
                attach={s.name: s.attach_report() for s in self._started},
                process=ProcessStats(cpu.user, cpu.system, self._proc.memory_info().rss),
                cgroup_path=self.cgroups.path,
                sweeps=self.sweeps,
                identity=self.identity,
                service_map=self.service_map,
                watch=self._watch_status(),
                saturation=summarize(areas.get("sat"), self.identity),
            )

    def __enter__(self) -> "Agent":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
