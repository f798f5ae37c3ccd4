"""The relay's own /metrics: nodes by state, client streams, flows relayed, drops, and the
sort window, built from the relay's state on every scrape (prometheus-client Collector).

Place in the data flow: exporter/grpc/relay.Relay's counters -> RelayCollector -> a private
CollectorRegistry served by prometheus_client's HTTP server (exporter/cli.py `relay`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshlens.exporter.proto import observer_pb2 as pb


class RelayCollector(Collector):
    def __init__(self, relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[object]:
        r = self.relay
        links = r._links()
        nodes = GaugeMetricFamily("meshlens_relay_nodes", "Agents the relay follows, by state", labels=["state"])
        counts = {"connected": 0, "unavailable": 0}
        for l in links:
            counts["connected" if l.state == pb.Node.NODE_CONNECTED else "unavailable"] += 1
        for state, n in counts.items():
            nodes.add_metric([state], n)
        yield nodes
        up = GaugeMetricFamily("meshlens_relay_node_up", "1 while the relay's stream from this agent is open",
                               labels=["node", "address"])
        conns = CounterMetricFamily("meshlens_relay_node_connects", "Streams opened to this agent (reconnects + 1)",
                                    labels=["node", "address"])
        per_node = CounterMetricFamily("meshlens_relay_node_flows", "Flows received from this agent",
                                       labels=["node", "address"])
        for l in links:
            up.add_metric([l.name, l.address], 1 if l.state == pb.Node.NODE_CONNECTED else 0)
            conns.add_metric([l.name, l.address], l.connects)
            per_node.add_metric([l.name, l.address], l.flows)
        yield up
        yield conns
        yield per_node
        yield GaugeMetricFamily("meshlens_relay_streams", "Client GetFlows streams open", value=r.servicer.streams)
        yield CounterMetricFamily("meshlens_relay_flows_relayed", "Flows released by the sort window to clients",
                                  value=r.relayed)
        drops = CounterMetricFamily("meshlens_relay_lost_events",
                                    "Events lost: reported by agents (by their source) or dropped for slow "
                                    "clients of the relay (OBSERVER_EVENTS_QUEUE)", labels=["source", "where"])
        for src, n in sorted(r.lost_upstream.items()):
            drops.add_metric([src, "agent"], n)
        drops.add_metric(["OBSERVER_EVENTS_QUEUE", "relay"], r.hub.lost_to_clients())
        yield drops
        yield CounterMetricFamily("meshlens_relay_late_flows", "Responses that arrived after the sort window had "
                                  "released newer ones (sent out of order)", value=r.window.late)
        yield CounterMetricFamily("meshlens_relay_forced_releases", "Responses released before their window ended "
                                  "because the window held its maximum", value=r.window.forced)
        yield GaugeMetricFamily("meshlens_relay_sort_window_items", "Responses held in the sort window",
                                value=len(r.window))


def serve_metrics(relay, host: str, port: int) -> Tuple[object, Optional[object]]:
    """Serve the relay's registry on host:port; returns prometheus_client's (server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))
    return start_http_server(port, addr=host, registry=registry)
