"""Builds the meshlens_agent_* families: the agent's own health, from every source's
SourceHealth, the attach choices, flow-table bounds and the process's CPU and memory."""
from __future__ import annotations

from typing import Iterable

from meshlens.agent.aggregate.flows import FlowSnapshot
from meshlens.agent.aggregate.snapshot import AgentSnapshot
from meshlens.agent.sources.tc.source import TcSnapshot

from meshlens.exporter.prometheus.metrics import family


def agent_families(snap: AgentSnapshot) -> Iterable[object]:
    read, lost, kern = family("meshlens_agent_events_read"), family("meshlens_agent_events_lost"), family("meshlens_agent_kernel_events")
    cb, entries, cap = family("meshlens_agent_callback_errors"), family("meshlens_agent_map_entries"), family("meshlens_agent_map_capacity_entries")
    for src, h in sorted(snap.health.items()):
        for t, n in sorted(h.events_read.items()):
            read.add_metric([src, t], n)
        for reason, n in sorted(h.events_lost.items()):
            lost.add_metric([src, reason], n)
        for c, n in sorted(h.kernel_counters.items()):
            kern.add_metric([src, c], n)
        cb.add_metric([src], h.callback_errors)
        for m, n in sorted(h.map_entries.items()):
            entries.add_metric([src, m], n)
        for m, n in sorted(h.map_capacity.items()):
            cap.add_metric([src, m], n)
    attach = family("meshlens_agent_attach_info")
    for src, choices in sorted(snap.attach.items()):
        for ch in choices:
            attach.add_metric([src, ch.signal, ch.chosen or "none"], 1 if ch.chosen else 0)
    over, expired, live = family("meshlens_agent_flow_overflows"), family("meshlens_agent_flows_expired"), family("meshlens_agent_flows_live")
    folded, rollups, capacity = (family("meshlens_agent_flow_peers_folded"), family("meshlens_agent_flow_rollups"),
                                 family("meshlens_agent_flow_rollup_capacity"))
    rtt_folded, promoted = family("meshlens_agent_rtt_peers_folded"), family("meshlens_agent_flow_peers_promoted")
    for src, area in sorted(snap.areas.items()):
        if isinstance(area, FlowSnapshot):
            over.add_metric([src], area.rollup_overflows)
            expired.add_metric([src], area.rollups_expired)
            live.add_metric([src], area.live_connections)
            folded.add_metric([src], area.peers_folded)
            promoted.add_metric([src], area.peers_promoted)
            rollups.add_metric([src], len(area.rollups))
            capacity.add_metric([src], area.max_rollups)
        elif isinstance(area, TcSnapshot):
            rtt_folded.add_metric([src], area.peers_folded)
    cpu = family("meshlens_agent_cpu_seconds")
    cpu.add_metric(["user"], snap.process.cpu_user_s)
    cpu.add_metric(["system"], snap.process.cpu_system_s)
    rss = family("meshlens_agent_resident_memory_bytes")
    rss.add_metric([], snap.process.rss_bytes)
    sweeps = family("meshlens_agent_sweeps")
    sweeps.add_metric([], snap.sweeps)
    return [read, lost, kern, cb, entries, cap, attach, over, expired, live, folded, promoted, rollups, capacity, rtt_folded, cpu, rss, sweeps, *watch_families(snap)]


def watch_families(snap: AgentSnapshot) -> Iterable[object]:
    """Health of the Kubernetes list+watch per resource (nothing in standalone mode)."""
    if not snap.watch:
        return []
    fams = {n: family(n) for n in ("meshlens_k8s_watch_up", "meshlens_k8s_watch_errors", "meshlens_k8s_watch_events",
                                   "meshlens_k8s_watch_relists", "meshlens_k8s_objects",
                                   "meshlens_k8s_watch_last_sync_timestamp_seconds")}
    for resource, st in sorted(snap.watch.items()):
        fams["meshlens_k8s_watch_up"].add_metric([resource], 1 if st.up else 0)
        fams["meshlens_k8s_watch_errors"].add_metric([resource], st.errors_total)
        fams["meshlens_k8s_watch_events"].add_metric([resource], st.events_total)
        fams["meshlens_k8s_watch_relists"].add_metric([resource], st.relists_gone_total)
        fams["meshlens_k8s_objects"].add_metric([resource], st.objects)
        if st.last_sync_unix:
            fams["meshlens_k8s_watch_last_sync_timestamp_seconds"].add_metric([resource], st.last_sync_unix)
    return list(fams.values())
