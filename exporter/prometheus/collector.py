"""The Prometheus collector: on every scrape, take one AgentSnapshot and let each area's
builder turn it into metric families. Keeps no state between scrapes (client_python's
custom-collector pattern). New areas register their builder in BUILDERS."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, List, Sequence

from prometheus_client.registry import Collector, CollectorRegistry

from meshlens.agent.aggregate.snapshot import AgentSnapshot

from meshlens.exporter.prometheus.agent import agent_families
from meshlens.exporter.prometheus.dns import dns_families
from meshlens.exporter.prometheus.http import http_families
from meshlens.exporter.prometheus.saturation import saturation_families
from meshlens.exporter.prometheus.service_map import edge_families
from meshlens.exporter.prometheus.tcp import tcp_families
from meshlens.exporter.prometheus.tc import tc_families

log = logging.getLogger("meshlens.exporter")

Builder = Callable[[AgentSnapshot], Iterable[object]]

BUILDERS: List[Builder] = [tcp_families, http_families, dns_families, edge_families, tc_families,
                           saturation_families, agent_families]


class MeshlensCollector(Collector):
    def __init__(self, snapshot: Callable[[], AgentSnapshot], builders: Sequence[Builder] = ()) -> None:
        self._snapshot = snapshot
        self._builders = list(builders) or BUILDERS

    def describe(self) -> Iterable[object]:
        return []  # families depend on traffic: nothing to describe up front

    def collect(self) -> Iterable[object]:
        snap = self._snapshot()
        for build in self._builders:
            yield from build(snap)


def make_registry(snapshot: Callable[[], AgentSnapshot], builders: Sequence[Builder] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshlensCollector(snapshot, builders))
    return registry


class ChainedCollector(Collector):
    """Several collectors as one, for the API that renders a single collector; more can be
    added after it was handed over (the gRPC server starts after the HTTP server)."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors: List[Collector] = list(collectors)

    def add(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def describe(self) -> Iterable[object]:
        return []

    def collect(self) -> Iterable[object]:
        for c in list(self._collectors):
            yield from c.collect()
