"""One table of every metric meshlens exports: name, type, help and labels.

The builders (exporter/prometheus/tcp.py, exporter/prometheus/agent.py, ...) look their families
up here, so names, help texts and label sets are defined once. Conventions (DESIGN.md §7):
`meshlens_<area>_<what>_<unit>`, base units, counters end in `_total` on the wire
(prometheus_client appends it; names here omit it).

Cardinality: every label below is bounded by the flow table's rollup cap (tcp) or by the
agent's own structure (agent). `network_peer_address` is the most dangerous one: on nodes
talking to many external clients, the rollup cap (default 10000) turns the excess into one
`__overflow__` series, counted in meshlens_agent_flow_overflows_total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from meshlens.agent.identity.model import LOCAL_LABELS, PEER_LABELS
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

EDGE_LABELS: Tuple[str, ...] = (
    "k8s_namespace_name", "k8s_owner_kind", "k8s_owner_name",
    "peer_k8s_namespace_name", "peer_k8s_owner_kind", "peer_k8s_owner_name",
)
POD_IF_LABELS: Tuple[str, ...] = ("interface", "netns") + LOCAL_LABELS
NETNS_LABELS: Tuple[str, ...] = ("netns",) + LOCAL_LABELS
PEER_EVENT_LABELS: Tuple[str, ...] = ("netns", "network_peer_address") + LOCAL_LABELS + PEER_LABELS
TCP_LABELS: Tuple[str, ...] = (
    ("direction", "process", "cgroup", "netns", "network_peer_address", "server_port") + LOCAL_LABELS + PEER_LABELS
)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: Tuple[str, ...]

    def family(self):
        cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[self.kind]
        return cls(self.name, self.help, labels=list(self.labels))


def _d(name: str, kind: str, help_: str, labels: Tuple[str, ...]) -> Tuple[str, MetricDef]:
    return name, MetricDef(name, kind, help_, labels)


METRICS: Dict[str, MetricDef] = dict(
    [
        # ---- L4 ----
        _d("meshlens_tcp_connections_opened", "counter", "TCP connections established (active or passive).", TCP_LABELS),
        _d("meshlens_tcp_connections_closed", "counter", "TCP connections closed.", TCP_LABELS),
        _d("meshlens_tcp_connections_active", "gauge", "TCP connections currently open and tracked.", TCP_LABELS),
        _d("meshlens_tcp_connect_failures", "counter",
           "Active opens that never got established, by reason (refused, timeout, unreachable, aborted, other).",
           TCP_LABELS + ("reason",)),
        _d("meshlens_tcp_sent_bytes", "counter", "Payload bytes sent on TCP connections.", TCP_LABELS),
        _d("meshlens_tcp_received_bytes", "counter", "Payload bytes received on TCP connections.", TCP_LABELS),
        _d("meshlens_tcp_retransmitted_segments", "counter",
           "TCP segments retransmitted (segments, not skbs: comparable with RetransSegs).", TCP_LABELS),
        _d("meshlens_tcp_resets_sent", "counter", "TCP RST segments sent.", TCP_LABELS),
        _d("meshlens_tcp_resets_received", "counter", "TCP RST segments received.", TCP_LABELS),
        _d("meshlens_tcp_connect_duration_seconds", "histogram",
           "Time from SYN sent to connection established (outbound connections).", TCP_LABELS),
        _d("meshlens_tcp_rtt_seconds", "histogram", "Smoothed round-trip time of each connection at close.", TCP_LABELS),
        _d("meshlens_tcp_connection_duration_seconds", "histogram", "Lifetime of closed TCP connections.", TCP_LABELS),
        # ---- service map edges (client -> server, per workload) ----
        _d("meshlens_edge_requests", "counter", "HTTP requests from the client workload to the server workload.", EDGE_LABELS),
        _d("meshlens_edge_request_errors", "counter", "HTTP requests on the edge answered with a 5xx status.", EDGE_LABELS),
        _d("meshlens_edge_sent_bytes", "counter", "TCP payload bytes sent from client to server on the edge.", EDGE_LABELS),
        _d("meshlens_edge_received_bytes", "counter", "TCP payload bytes sent from server back to client.", EDGE_LABELS),
        _d("meshlens_edge_connections_opened", "counter", "TCP connections opened on the edge.", EDGE_LABELS),
        _d("meshlens_edge_connections_active", "gauge", "TCP connections open on the edge.", EDGE_LABELS),
        # ---- tc: pod interfaces (host-side veth; ingress = sent by the pod) ----
        _d("meshlens_pod_interface_info", "gauge", "Interfaces the tc programs watch (value 1); netns is the pod's network namespace inode.", POD_IF_LABELS + ("ifindex", "kind", "attached")),
        _d("meshlens_pod_interface_packets", "counter", "Packets (skbs, as the interface counts them) seen by tc on a pod's host-side veth.", POD_IF_LABELS + ("direction",)),
        _d("meshlens_pod_interface_bytes", "counter", "Bytes (L2 frames, as the interface counts them) seen by tc on a pod's host-side veth.", POD_IF_LABELS + ("direction",)),
        _d("meshlens_pod_interface_segments", "counter", "Packets after GSO segmentation (max(1, gso_segs) per skb).", POD_IF_LABELS + ("direction",)),
        _d("meshlens_pod_interface_tcp_flags", "counter", "TCP segments by flag (syn: SYN without ACK, synack, fin, rst).", POD_IF_LABELS + ("direction", "flag")),
        _d("meshlens_pod_interface_parse_failures", "counter", "Frames whose headers tc could not parse (reasons in meshlens_tc_parse_failures_total).", POD_IF_LABELS + ("direction",)),
        _d("meshlens_pod_interface_drops", "counter", "Packets dropped by the kernel on a watched device (skb:kfree_skb), by side (host veth or pod eth0) and kernel drop reason.", POD_IF_LABELS + ("side", "reason")),
        _d("meshlens_pod_interface_handshake_rtt_seconds", "histogram", "Time from a SYN to its SYN-ACK passing the pod's veth, per peer; role client: the pod sent the SYN.", POD_IF_LABELS + ("role", "network_peer_address") + PEER_LABELS),
        _d("meshlens_tc_parse_failures", "counter", "Frames tc could not parse, by reason (short_*: cut off; bad_*: invalid header; *_too_deep: over the walk limit).", ("reason",)),
        # ---- saturation (bpf/saturation.bpf.c; netns = the pod's network namespace inode) ----
        _d("meshlens_net_drops", "counter", "Packets the kernel dropped (skb:kfree_skb), per network namespace, L3 protocol and kernel drop reason; every drop, where meshlens_pod_interface_drops_total counts only those on a watched pod veth.", NETNS_LABELS + ("protocol", "reason")),
        _d("meshlens_tcp_listen_overflows", "counter", "Connections a listening socket dropped because its accept queue was full (the listener's drop counter; ListenOverflows/ListenDrops).", NETNS_LABELS + ("listen_address", "server_port")),
        _d("meshlens_tcp_accept_queue_length", "gauge", "Connections waiting in a listener's accept queue at the last sweep (sk_ack_backlog).", NETNS_LABELS + ("listen_address", "server_port")),
        _d("meshlens_tcp_accept_queue_limit", "gauge", "Accept-queue limit of a listener (sk_max_ack_backlog: the listen() backlog capped by somaxconn).", NETNS_LABELS + ("listen_address", "server_port")),
        _d("meshlens_tcp_zero_window_connections", "gauge", "Connections at zero window at the last sweep; side local: this pod's receiver is full, peer: the peer's is.", PEER_EVENT_LABELS + ("side",)),
        _d("meshlens_socket_buffer_events", "counter", "Socket buffer pressure, per pod and peer: rcvbuf_drop (dropped for lack of room, by reason), rcvqueue_full (sock_rcvqueue_full), exceed_buf_limit (send or receive).", PEER_EVENT_LABELS + ("event", "reason")),
        _d("meshlens_socket_errors", "counter", "Errors reported on sockets (sock:inet_sk_error_report), by errno name, per pod and peer.", PEER_EVENT_LABELS + ("error",)),
        _d("meshlens_tcp_connect_port_exhausted", "counter", "TCP connects that failed for lack of a free local port (EADDRNOTAVAIL), per pod and peer.", PEER_EVENT_LABELS),
        _d("meshlens_net_ephemeral_ports_in_use", "gauge", "Distinct local ports inside ip_local_port_range held by a socket, per network namespace.", ("netns",)),
        _d("meshlens_net_ephemeral_ports_limit", "gauge", "Ports in the namespace's ip_local_port_range.", ("netns",)),
        _d("meshlens_net_conntrack_entries", "gauge", "Connection-tracking entries in the namespace (nf_conntrack_count).", ("netns",)),
        _d("meshlens_net_conntrack_limit_entries", "gauge", "Connection-tracking table limit (nf_conntrack_max).", ("netns",)),
        # ---- the agent itself ----
        _d("meshlens_agent_events_read", "counter", "Ring-buffer records read by the agent.", ("source", "type")),
        _d("meshlens_agent_events_lost", "counter",
           "Kernel records lost or diverted, by reason (ringbuf_full: dropped; map_full: sent as overflow records).",
           ("source", "reason")),
        _d("meshlens_agent_kernel_events", "counter", "Kernel-side event counters of each BPF program (calls seen, drops), by counter name.", ("source", "counter")),
        _d("meshlens_agent_callback_errors", "counter", "Records the agent could not decode or process.", ("source",)),
        _d("meshlens_agent_map_entries", "gauge", "Entries in a kernel map at the last sweep.", ("source", "map")),
        _d("meshlens_agent_map_capacity_entries", "gauge", "Maximum entries of a kernel map.", ("source", "map")),
        _d("meshlens_agent_flow_overflows", "counter",
           "Flow rollups folded into the __overflow__ series because the rollup cap was reached.", ("source",)),
        _d("meshlens_agent_flow_peers_folded", "counter",
           "Connections credited to their workload's `external` peer because it already keeps "
           "--external-peers-per-workload external peer addresses.", ("source",)),
        _d("meshlens_agent_flow_peers_promoted", "counter",
           "Folded external peers that moved more bytes than a kept one and took its place (the kept one's "
           "series merged into `external`).", ("source",)),
        _d("meshlens_agent_rtt_peers_folded", "gauge",
           "Peer addresses whose handshake RTT is summed into their interface's `external` peer (at the last sweep).",
           ("source",)),
        _d("meshlens_agent_flow_rollups", "gauge", "Flow rollups in the table (the overflow and `external` ones included).",
           ("source",)),
        _d("meshlens_agent_flow_rollup_capacity", "gauge", "Rollup cap: the series budget (--max-series) divided by "
           "the series per rollup, or --max-flows if lower.", ("source",)),
        _d("meshlens_agent_flows_expired", "counter", "Idle flow rollups expired after the TTL.", ("source",)),
        _d("meshlens_agent_flows_live", "gauge", "Connections currently tracked by the flow table.", ("source",)),
        _d("meshlens_agent_attach_info", "gauge", "Attach point chosen for each signal (value 1).",
           ("source", "signal", "variant")),
        _d("meshlens_agent_cpu_seconds", "counter", "CPU time used by the agent process.", ("mode",)),
        _d("meshlens_agent_resident_memory_bytes", "gauge", "Resident memory of the agent process.", ()),
        _d("meshlens_agent_sweeps", "counter", "Map sweeps completed.", ()),
        # ---- Kubernetes watch (identity) ----
        _d("meshlens_k8s_watch_up", "gauge", "1 while the list+watch of a resource is healthy.", ("resource",)),
        _d("meshlens_k8s_watch_errors", "counter", "Failed lists and watches, by resource.", ("resource",)),
        _d("meshlens_k8s_watch_events", "counter", "Watch events applied, by resource.", ("resource",)),
        _d("meshlens_k8s_watch_relists", "counter", "Full re-lists after 410 Gone, by resource.", ("resource",)),
        _d("meshlens_k8s_objects", "gauge", "Objects of each resource in the agent's cluster view.", ("resource",)),
        _d("meshlens_k8s_watch_last_sync_timestamp_seconds", "gauge",
           "Unix time of the last successful list of each resource.", ("resource",)),
    ]
)


def family(name: str):
    return METRICS[name].family()
