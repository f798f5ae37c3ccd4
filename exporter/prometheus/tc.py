"""Builds the meshlens_pod_interface_* and meshlens_tc_* families from the tc area of an
AgentSnapshot (agent/sources/tc/source.TcSnapshot).

Labels: `interface` (host-side veth name), `netns` (inode of the pod's network namespace) and
the k8s_* labels of the pod behind it (the snapshot's identity view maps the netns to a pod);
all bounded by the pods on the node. The handshake RTT histogram adds `network_peer_address`
and the peer_k8s_* labels, bounded by the kernel `rtt` map (4096 entries by default; beyond
that samples are counted in meshlens_agent_events_lost{reason="rtt_full"}). Series of a
removed interface stop with the sweep after it disappears, and those of a pod deleted more
than the identity TTL ago are not exported.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from meshlens.agent.aggregate.snapshot import AgentSnapshot
from meshlens.agent.sources.tc.source import InterfaceInfo, TcSnapshot
from meshlens.agent.sources.tc.structs import rtt_bucket_bounds

from meshlens.exporter.prometheus.identity_labels import local_values, peer_values
from meshlens.exporter.prometheus.metrics import family

_FLAGS = (("syn", "tcp_syn"), ("synack", "tcp_synack"), ("fin", "tcp_fin"), ("rst", "tcp_rst"))


def _labels(info: InterfaceInfo | None, ifindex: int, snap: AgentSnapshot) -> Optional[List[str]]:
    """interface, netns and the k8s_* labels of the pod behind the interface; None when that
    pod was deleted more than the identity TTL ago."""
    name, netns = (info.name, info.peer_netns) if info else (f"ifindex{ifindex}", 0)
    local = local_values(snap, 0, netns, "")
    return None if local is None else [name, str(netns)] + local


def _cumulative(slots) -> List[tuple]:
    bounds = rtt_bucket_bounds()
    out, acc = [], 0
    for bound, n in zip(bounds, slots):
        acc += n
        out.append((repr(bound), acc))
    out.append(("+Inf", sum(slots)))
    return out


def tc_families(snap: AgentSnapshot) -> Iterable[object]:
    tc = snap.areas.get("tc")
    if not isinstance(tc, TcSnapshot):
        return []
    labels: Dict[int, Optional[List[str]]] = {}

    def of(ifindex: int) -> Optional[List[str]]:
        if ifindex not in labels:
            labels[ifindex] = _labels(tc.interfaces.get(ifindex), ifindex, snap)
        return labels[ifindex]

    info = family("meshlens_pod_interface_info")
    for i in sorted(tc.interfaces.values(), key=lambda x: x.ifindex):
        if of(i.ifindex) is not None:
            info.add_metric(of(i.ifindex) + [str(i.ifindex), i.kind, str(i.attached).lower()], 1)
    packets, nbytes = family("meshlens_pod_interface_packets"), family("meshlens_pod_interface_bytes")
    segs, flags = family("meshlens_pod_interface_segments"), family("meshlens_pod_interface_tcp_flags")
    failures = family("meshlens_pod_interface_parse_failures")
    for (ifindex, direction), c in sorted(tc.counters.items()):
        if of(ifindex) is None:
            continue
        base = of(ifindex) + [direction]
        packets.add_metric(base, c.packets)
        nbytes.add_metric(base, c.bytes)
        segs.add_metric(base, c.segs)
        failures.add_metric(base, c.parse_failures)
        for flag, attr in _FLAGS:
            flags.add_metric(base + [flag], getattr(c, attr))
    drops = family("meshlens_pod_interface_drops")
    for (ifindex, side, reason), n in sorted(tc.drops.items()):
        if of(ifindex) is not None:
            drops.add_metric(of(ifindex) + [side, reason], n)
    rtt = family("meshlens_pod_interface_handshake_rtt_seconds")
    for (ifindex, role, peer), h in sorted(tc.rtt.items()):
        peer_labels = peer_values(snap, peer)
        if h.count and of(ifindex) is not None and peer_labels is not None:
            rtt.add_metric(of(ifindex) + [role, peer] + peer_labels, _cumulative(h.slots), h.sum_s)
    reasons = family("meshlens_tc_parse_failures")
    for reason, n in sorted(tc.parse_failures.items()):
        reasons.add_metric([reason], n)
    return [info, packets, nbytes, segs, flags, failures, drops, rtt, reasons]
