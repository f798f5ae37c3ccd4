"""Builds the saturation families (meshlens_net_drops_total, meshlens_tcp_listen_overflows_total,
...) from the `sat` area of an AgentSnapshot (agent/sources/saturation/source.SatSnapshot).

Labels: `netns` (inode of the network namespace) and the k8s_* labels of the pod there (by
socket cgroup where the kernel knew the socket, else by namespace); per-peer families add
`network_peer_address` and the peer_k8s_* labels. Cardinality is bounded by the kernel maps
(`drops`, `sock_events`: 4096 entries each by default; beyond that events are counted in
meshlens_agent_events_lost_total{source="sat"}) and, for sampled gauges, by the sockets
and namespaces that exist at the sweep. Series of a pod deleted more than the identity TTL
ago are not exported.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from meshlens.agent.aggregate.snapshot import AgentSnapshot
from meshlens.agent.sources.saturation.source import SatSnapshot

from meshlens.exporter.prometheus.identity_labels import local_values, peer_values
from meshlens.exporter.prometheus.metrics import family


def saturation_families(snap: AgentSnapshot) -> Iterable[object]:
    sat = snap.areas.get("sat")
    if not isinstance(sat, SatSnapshot):
        return []
    local: Dict[Tuple[int, int], Optional[List[str]]] = {}
    peers: Dict[str, Optional[List[str]]] = {}

    def who(netns: int, cgroup: int) -> Optional[List[str]]:
        if (netns, cgroup) not in local:
            vals = local_values(snap, cgroup, netns, "")
            local[(netns, cgroup)] = None if vals is None else [str(netns)] + vals
        return local[(netns, cgroup)]

    def with_peer(netns: int, cgroup: int, peer: str) -> Optional[List[str]]:
        base = who(netns, cgroup)
        if peer not in peers:
            peers[peer] = peer_values(snap, peer) if peer else ["", "", "", ""]
        if base is None or peers[peer] is None:
            return None
        return [base[0], peer] + base[1:] + peers[peer]

    drops = family("meshlens_net_drops")
    for (netns, cgroup, proto, reason), n in sorted(sat.drops.items()):
        if who(netns, cgroup) is not None:
            drops.add_metric(who(netns, cgroup) + [proto, reason], n)
    overflows = family("meshlens_tcp_listen_overflows")
    queue, limit = family("meshlens_tcp_accept_queue_length"), family("meshlens_tcp_accept_queue_limit")
    for (netns, addr, port), lst in sorted(sat.listeners.items()):
        base = who(netns, lst.cgroup_id)
        if base is None:
            continue
        labels = base + [addr, str(port)]
        overflows.add_metric(labels, lst.overflows)
        queue.add_metric(labels, lst.queue)
        limit.add_metric(labels, lst.limit)
    zero = family("meshlens_tcp_zero_window_connections")
    for (netns, cgroup, peer, side), n in sorted(sat.zero_window.items()):
        labels = with_peer(netns, cgroup, peer)
        if labels is not None:
            zero.add_metric(labels + [side], n)
    buffers, errors = family("meshlens_socket_buffer_events"), family("meshlens_socket_errors")
    ports_failed = family("meshlens_tcp_connect_port_exhausted")
    for (netns, cgroup, peer, kind, detail), n in sorted(sat.sock_events.items()):
        labels = with_peer(netns, cgroup, peer)
        if labels is None:
            continue
        if kind == "error":
            errors.add_metric(labels + [detail], n)
        elif kind == "port_exhausted":
            ports_failed.add_metric(labels, n)
        else:
            buffers.add_metric(labels + [kind, detail], n)
    in_use, port_limit = family("meshlens_net_ephemeral_ports_in_use"), family("meshlens_net_ephemeral_ports_limit")
    for netns, p in sorted(sat.ephemeral.items()):
        in_use.add_metric([str(netns)], p.in_use)
        port_limit.add_metric([str(netns)], p.size)
    ct, ct_limit = family("meshlens_net_conntrack_entries"), family("meshlens_net_conntrack_limit_entries")
    for netns, c in sorted(sat.conntrack.items()):
        ct.add_metric([str(netns)], c.count)
        ct_limit.add_metric([str(netns)], c.limit)
    return [drops, overflows, queue, limit, zero, buffers, errors, ports_failed, in_use, port_limit, ct, ct_limit]
