"""Saturation summary per workload: the fourth golden signal beside latency, traffic and errors.

Folds the saturation source's snapshot (agent/sources/saturation/source.SatSnapshot) through
the identity view into one plain record per local workload, carried in the AgentSnapshot
(`saturation`) for the REST API and the service map to show. Fill ratios are the worst one
seen among the workload's listeners and network namespaces (0 when nothing is known).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

from meshlens.agent.identity.model import IdentityView, Workload
from meshlens.agent.sources.saturation.source import SatSnapshot


@dataclass(frozen=True)
class WorkloadSaturation:
    drops: int = 0                    # skbs the kernel dropped in the workload's sockets or namespaces
    netfilter_drops: int = 0          # of which reason netfilter_drop (a firewall rule)
    listen_overflows: int = 0         # connections refused for a full accept queue
    accept_queue_fill: float = 0.0    # max over listeners of queue / limit, sampled
    zero_window_connections: int = 0  # connections at zero window now (either side)
    buffer_events: int = 0            # rcvbuf drops, receive queue full, buffer limit
    socket_errors: int = 0            # errors reported on its sockets (refused, timed out, ...)
    port_exhaustion_failures: int = 0  # connects that found no free ephemeral port
    ephemeral_ports_fill: float = 0.0  # ports in use / ip_local_port_range, per namespace, max
    conntrack_fill: float = 0.0        # nf_conntrack_count / nf_conntrack_max, max


def _ratio(used: int, limit: int) -> float:
    return used / limit if limit > 0 else 0.0


def summarize(sat: Optional[SatSnapshot], identity: IdentityView) -> Dict[Workload, WorkloadSaturation]:
    """{local workload: its saturation} from one saturation snapshot; {} without one."""
    if sat is None:
        return {}
    out: Dict[Workload, WorkloadSaturation] = {}
    netns_of: Dict[int, set] = {}

    def add(cgroup: int, netns: int, **delta: float) -> None:
        w = identity.local(cgroup, netns, "")
        netns_of.setdefault(netns, set()).add(w)
        cur = out.get(w, WorkloadSaturation())
        changes = {}
        for k, v in delta.items():
            old = getattr(cur, k)
            changes[k] = max(old, v) if isinstance(old, float) else old + v
        out[w] = replace(cur, **changes)

    for (netns, cgroup, _proto, reason), n in sat.drops.items():
        add(cgroup, netns, drops=n, netfilter_drops=n if reason == "netfilter_drop" else 0)
    for (netns, addr, port), lst in sat.listeners.items():
        add(lst.cgroup_id, netns, listen_overflows=lst.overflows, accept_queue_fill=_ratio(lst.queue, lst.limit))
    for (netns, cgroup, _peer, _side), n in sat.zero_window.items():
        add(cgroup, netns, zero_window_connections=n)
    for (netns, cgroup, _peer, kind, _detail), n in sat.sock_events.items():
        if kind == "error":
            add(cgroup, netns, socket_errors=n)
        elif kind == "port_exhausted":
            add(cgroup, netns, port_exhaustion_failures=n)
        else:
            add(cgroup, netns, buffer_events=n)
    # namespace-wide limits apply to every workload seen in that namespace
    for netns, ports in sat.ephemeral.items():
        for w in netns_of.get(netns, ()):
            out[w] = replace(out[w], ephemeral_ports_fill=max(out[w].ephemeral_ports_fill,
                                                                _ratio(ports.in_use, ports.size)))
    for netns, ct in sat.conntrack.items():
        for w in netns_of.get(netns, ()):
            out[w] = replace(out[w], conntrack_fill=max(out[w].conntrack_fill, _ratio(ct.count, ct.limit)))
    return out
