"""The agent's gRPC Observer counters on its own /metrics: clients following, flows
published, responses dropped for slow clients, conversion errors (prometheus-client Collector).

Place in the data flow: exporter/grpc/observer.AgentFeed (its FlowHub) -> ObserverCollector
-> the agent's /metrics (exporter/cli.py chains it after MeshlensCollector when --grpc-listen
is set). ServerStatus reports the same numbers to gRPC clients.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class ObserverCollector(Collector):
    def __init__(self, feed) -> None:
        self.feed = feed

    def collect(self) -> Iterator[object]:
        feed, hub = self.feed, self.feed.hub
        yield GaugeMetricFamily("meshlens_grpc_clients", "GetFlows streams open on this agent",
                                value=hub.subscribers)
        yield GaugeMetricFamily("meshlens_grpc_following", "1 while follow mode is on in the kernel "
                                "(connection events and the HTTP tap switched on for the stream)",
                                value=1 if feed.following else 0)
        yield CounterMetricFamily("meshlens_grpc_flows_published", "Flows published to the stream's ring and clients",
                                  value=hub.seen_flows)
        yield CounterMetricFamily("meshlens_grpc_client_lost_events", "Responses dropped for clients that fell "
                                  "behind (each told with lost_events)", value=hub.lost_to_clients())
        yield CounterMetricFamily("meshlens_grpc_conversion_errors", "Events that could not be turned into a flow",
                                  value=feed.conversion_errors)
        yield CounterMetricFamily("meshlens_grpc_left_out", "Events of processes that are no pod, left out "
                                  "with --grpc-pods-only", value=feed.left_out)
        yield GaugeMetricFamily("meshlens_grpc_ring_flows", "Responses held for clients that ask for history",
                                value=len(hub.past()))

