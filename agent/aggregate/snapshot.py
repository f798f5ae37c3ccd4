"""AgentSnapshot: the one object the exporter reads. Built by agent/runner.py on demand from
each source's snapshot() and health(); immutable from the exporter's point of view."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from meshlens.agent.aggregate.saturation import WorkloadSaturation
from meshlens.agent.identity.model import IdentityView, StandaloneIdentity, Workload
from meshlens.agent.sources.base import AttachChoice, SourceHealth


@dataclass(frozen=True)
class ProcessStats:
    cpu_user_s: float
    cpu_system_s: float
    rss_bytes: int


@dataclass(frozen=True)
class AgentSnapshot:
    areas: Dict[str, object]                 # Source.name -> that source's snapshot()
    health: Dict[str, SourceHealth]
    attach: Dict[str, List[AttachChoice]]
    process: ProcessStats
    cgroup_path: Callable[[int], str] = field(default=lambda _id: "")
    sweeps: int = 0
    identity: IdentityView = field(default_factory=StandaloneIdentity)
    service_map: Optional[object] = None     # agent.service_map.ServiceMap
    watch: Dict[str, object] = field(default_factory=dict)  # resource -> k8s_watch.WatchStatus
    saturation: Dict[Workload, WorkloadSaturation] = field(default_factory=dict)  # per local workload
