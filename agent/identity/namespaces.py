"""Namespaces to include or exclude: an IdentityView whose `expired()` is also true for a
workload in a namespace the configuration leaves out, so every family (TCP, HTTP, DNS, tc,
service map) stops exporting series naming it, on either side, at the one place that
already drops series of deleted pods (exporter/prometheus/identity_labels.py).

Workloads without a namespace (processes, external peers, the node itself) are never left
out. Capture is unchanged: this bounds what is exported, not what the kernel sees.
"""
from __future__ import annotations

from typing import Any, FrozenSet, Iterable

from meshlens.agent.identity.model import IdentityView, Workload


class NamespaceFilter:
    def __init__(self, view: IdentityView, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self._view = view
        self.include: FrozenSet[str] = frozenset(include)
        self.exclude: FrozenSet[str] = frozenset(exclude)

    def wanted(self, namespace: str) -> bool:
        if not namespace:
            return True
        if self.include and namespace not in self.include:
            return False
        return namespace not in self.exclude

    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return self._view.local(cgroup_id, netns, process)

    def peer(self, address: str) -> Workload:
        return self._view.peer(address)

    def expired(self, workload: Workload) -> bool:
        return self._view.expired(workload) or not self.wanted(workload.namespace)

    def __getattr__(self, name: str) -> Any:  # the wrapped view's other parts (cgroups, ...)
        return getattr(self._view, name)
