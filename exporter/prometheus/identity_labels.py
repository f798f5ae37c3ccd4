"""Identity label values for every family (TCP, HTTP, DNS, ...), from the snapshot's
identity view: one place that decides the k8s_* / peer_k8s_* values and that a series of a
pod deleted more than the TTL ago is no longer exported (None)."""
from __future__ import annotations

from typing import List, Optional

from meshlens.agent.aggregate.snapshot import AgentSnapshot


def local_values(snap: AgentSnapshot, cgroup_id: int, netns: int, process: str) -> Optional[List[str]]:
    w = snap.identity.local(cgroup_id, netns, process)
    return None if snap.identity.expired(w) else list(w.local_labels().values())


def peer_values(snap: AgentSnapshot, address: str) -> Optional[List[str]]:
    w = snap.identity.peer(address)
    return None if snap.identity.expired(w) else list(w.peer_labels().values())
