"""What the agent knows about who is at either end of a flow, as exporters see it.

Kernel facts (cgroup id, netns inode, IP address) go in; names users think in (namespace,
pod, owner workload, service) come out. The implementation (agent/identity/resolver.py: kubelet
cgroup naming, netns/IP to pod, the Kubernetes watch) fills an IdentityView; exporters and
the service map only call these methods and the label helpers below, so the label set is
defined once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol

LOCAL_LABELS = ("k8s_namespace_name", "k8s_pod_name", "k8s_owner_kind", "k8s_owner_name")
PEER_LABELS = ("peer_k8s_namespace_name", "peer_k8s_pod_name", "peer_k8s_owner_kind", "peer_k8s_owner_name")


@dataclass(frozen=True)
class Workload:
    """A pod and the workload that owns it (Deployment, DaemonSet, StatefulSet, Job, ... or
    the pod itself when it has no owner). Outside Kubernetes: namespace "", pod "", owner
    kind "process" and owner name the process name (standalone mode)."""

    namespace: str
    pod: str
    owner_kind: str
    owner_name: str

    def local_labels(self) -> Dict[str, str]:
        return dict(zip(LOCAL_LABELS, (self.namespace, self.pod, self.owner_kind, self.owner_name)))

    def peer_labels(self) -> Dict[str, str]:
        return dict(zip(PEER_LABELS, (self.namespace, self.pod, self.owner_kind, self.owner_name)))


UNKNOWN = Workload("", "", "", "")


def external(address: str, name: Optional[str] = None) -> Workload:
    """A peer outside the cluster: kind "external", named by a configured CIDR name or its IP."""
    return Workload("", "", "external", name or address)


def service(namespace: str, name: str) -> Workload:
    """A ClusterIP service address that was not translated to a pod (seen before DNAT)."""
    return Workload(namespace, "", "Service", name)


class IdentityView(Protocol):
    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        """The local side of a flow: from its socket's cgroup (kubelet naming) and netns."""

    def peer(self, address: str) -> Workload:
        """The remote side: a pod IP, a ClusterIP service, or an external address."""

    def expired(self, workload: Workload) -> bool:
        """True once the workload's pod (or service) was deleted more than a TTL ago: its
        series stop being exported."""


class StandaloneIdentity:
    """No Kubernetes: the local side is named by its process; peers by their address."""

    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return Workload("", "", "process", process)

    def peer(self, address: str) -> Workload:
        return external(address)

    def expired(self, workload: Workload) -> bool:
        return False
