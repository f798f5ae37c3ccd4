"""IdentityResolver: kernel facts (cgroup id, netns inode, IP address) -> Workload names.

Place in the data flow (DESIGN.md decision 5): flows and L7 stats carry a socket's cgroup id,
netns and peer address; exporters and the service map call `local()` and `peer()` of an
IdentityView (agent/identity/model.py) for each series and `expired()` to drop series of
pods deleted long ago. This module is the Kubernetes implementation of that view:

local(cgroup_id, netns, process), first that answers:
  1. cgroup id -> path (agent/identity/cgroups.py) -> pod UID (agent/identity/kubelet_cgroups.py) -> pod in the
     watch (agent/identity/k8s_state.py; static pods by config hash) -> namespace, pod, owner;
  2. netns -> a process in it -> its cgroup path -> pod, else the netns's addresses -> pod IP
     (agent/identity/netns.py);
  3. standalone naming: Workload("", "", "process", process).
peer(address), first that answers (IPv4-mapped IPv6 is read as IPv4):
  1. a pod IP of a pod on this node (status.podIPs) -> that pod and owner;
  2. an EndpointSlice address (pods on other nodes) -> namespace, pod and the owner read off
     the pod name when a known ReplicaSet/StatefulSet/DaemonSet/Job matches it, else the
     Service it backs (owner kind "Service");
  3. a ClusterIP -> service(namespace, name);
  4. the longest configured CIDR that contains it -> external(address, cidr name);
  5. external(address).

Owners: the pod's controller ownerReference, followed one step: ReplicaSet -> its Deployment
(from the ReplicaSet's own ownerReference, or from the pod-template-hash suffix when the
ReplicaSet is not known), Job -> its CronJob. A pod without a controller (or a static pod,
whose owner is its Node) is its own owner: kind "Pod", name the pod's name.

Contract for exporters (deleted pods):
  - A deleted pod keeps resolving to its names (tombstone), so flows still draining after
    the deletion are credited to it.
  - `expired(workload)` is True once the pod (or Service, for service(...) workloads) was
    deleted more than `ttl_s` ago (default 300 s, on the injected `clock`) and no pod of
    that namespace/name exists again. Exporters skip a series whose local or peer workload
    is expired; that is how series of deleted pods stop being exported.
  - Workloads that are not pods (process, external, unknown) never expire here; the flow
    table's own idle TTL retires them.
  - If the API watch is down, nothing is deleted: names stay as last known.
"""
from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple

from meshlens.agent.identity.cgroups import CgroupResolver
from meshlens.agent.identity.model import UNKNOWN, Workload, external, service
from meshlens.agent.identity.k8s_state import ClusterState, EndpointTarget, PodInfo
from meshlens.agent.identity.k8s_kinds import DAEMONSET, DEPLOYMENT, JOB, REPLICASET, STATEFULSET
from meshlens.agent.identity.kubelet_cgroups import ContainerCgroup, parse_cgroup_path
from meshlens.agent.identity.netns import NetnsLocator

log = logging.getLogger("meshlens.identity")

DEFAULT_TTL_S = 300.0
POD_KIND = "Pod"


@lru_cache(maxsize=65536)
def _parse(path: str) -> Optional[ContainerCgroup]:
    return parse_cgroup_path(path)


@lru_cache(maxsize=65536)
def normalize_address(address: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class CidrNames:
    """Longest-prefix match of an address against named CIDRs, e.g. {"10.0.0.0/8": "corp"}."""

    def __init__(self, names: Mapping[str, str]) -> None:
        nets = [(ipaddress.ip_network(cidr, strict=False), name) for cidr, name in names.items()]
        self._nets = sorted(nets, key=lambda n: n[0].prefixlen, reverse=True)
        self.name = lru_cache(maxsize=65536)(self._name)  # type: ignore[method-assign]

    def _name(self, address: str) -> Optional[str]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net, name in self._nets:
            if ip.version == net.version and ip in net:
                return name
        return None


def parse_cidr_names(spec: str) -> Dict[str, str]:
    """'10.0.0.0/8=corp,192.168.0.0/16=office' -> {"10.0.0.0/8": "corp", ...} (for the CLI)."""
    out: Dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        cidr, sep, name = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected CIDR=NAME, got {item!r}")
        ipaddress.ip_network(cidr.strip(), strict=False)  # raises ValueError if malformed
        out[cidr.strip()] = name.strip()
    return out


class IdentityResolver:
    """The Kubernetes IdentityView. Thread-safe; cheap enough to call per series per scrape."""

    def __init__(self, state: ClusterState, cgroups: Optional[CgroupResolver] = None,
                 netns: Optional[NetnsLocator] = None, cidr_names: Mapping[str, str] = {},
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        self.state = state
        self.cgroups = cgroups if cgroups is not None else CgroupResolver()
        self.netns = netns
        self.cidrs = CidrNames(cidr_names)
        self.ttl_s = ttl_s

    # -- local side

    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        path = self.cgroups.path(cgroup_id) if cgroup_id else ""
        pod = self._pod_of_cgroup(path)
        if pod is None and self.netns is not None and netns:
            pod = self._pod_of_netns(netns)
        if pod is not None:
            return self._workload(pod)
        return Workload("", "", "process", process)

    def cgroup_path(self, cgroup_id: int) -> str:
        """For a debug label in standalone naming."""
        return self.cgroups.path(cgroup_id) if cgroup_id else ""

    def container(self, cgroup_id: int) -> Optional[ContainerCgroup]:
        """Container id, pod UID, QoS and runtime of a cgroup, when kubelet named it."""
        return _parse(self.cgroup_path(cgroup_id)) if cgroup_id else None

    def _pod_of_cgroup(self, path: str) -> Optional[PodInfo]:
        info = _parse(path) if path else None
        if info is None or not info.pod_uid:
            return None
        return self.state.pod_by_uid(info.pod_uid)

    def _pod_of_netns(self, netns: int) -> Optional[PodInfo]:
        found = self.netns.lookup(netns) if self.netns is not None else None
        if found is None:
            return None
        pod = self._pod_of_cgroup(found.cgroup_path)
        if pod is not None:
            return pod
        for addr in found.addresses:
            pod = self.state.pod_by_ip(normalize_address(addr))
            if pod is not None:
                return pod
        return None

    # -- remote side

    def peer(self, address: str) -> Workload:
        if not address:
            return UNKNOWN
        ip = normalize_address(address)
        pod = self.state.pod_by_ip(ip)
        if pod is not None:
            return self._workload(pod)
        target = self.state.endpoint_by_ip(ip)
        if target is not None:
            return self._endpoint_workload(target)
        svc = self.state.service_by_ip(ip)
        if svc is not None:
            return service(*svc)
        return external(ip, self.cidrs.name(ip))

    # -- expiry

    def expired(self, workload: Workload) -> bool:
        """True once the workload's pod (or service) was deleted more than ttl_s ago."""
        if workload.pod:
            gone = self.state.pod_deleted_for(workload.namespace, workload.pod)
        elif workload.owner_kind == "Service":
            gone = self.state.service_deleted_for(workload.namespace, workload.owner_name)
        else:
            return False
        return gone is not None and gone > self.ttl_s

    # -- owners

    def _workload(self, pod: PodInfo) -> Workload:
        kind, name = self.owner(pod.namespace, pod.name, pod.owner_kind, pod.owner_name, pod.template_hash)
        return Workload(pod.namespace, pod.name, kind, name)

    def owner(self, namespace: str, pod: str, kind: str, name: str, template_hash: str = "") -> Tuple[str, str]:
        """The workload that owns a pod, following ReplicaSet -> Deployment and Job -> CronJob."""
        if kind == "ReplicaSet":
            up = self.state.controller(REPLICASET, namespace, name)
            if up is not None:
                return up if up[0] else ("ReplicaSet", name)
            if template_hash and name.endswith("-" + template_hash):
                return "Deployment", name[: -len(template_hash) - 1]
            return kind, name
        if kind == "Job":
            up = self.state.controller(JOB, namespace, name)
            if up is not None and up[0]:
                return up
            return kind, name
        if not kind or kind == "Node":
            return POD_KIND, pod
        return kind, name

    def _endpoint_workload(self, target: EndpointTarget) -> Workload:
        """A pod seen only through an EndpointSlice: guess its controller from its name."""
        ns, pod = target.namespace, target.pod
        base, _, _ = pod.rpartition("-")
        if base:
            if self.state.controller(REPLICASET, ns, base) is not None:
                kind, name = self.owner(ns, pod, "ReplicaSet", base)
                return Workload(ns, pod, kind, name)
            if self.state.controller(JOB, ns, base) is not None:
                kind, name = self.owner(ns, pod, "Job", base)
                return Workload(ns, pod, kind, name)
            for resource, kind in ((STATEFULSET, "StatefulSet"), (DAEMONSET, "DaemonSet")):
                if self.state.has(resource, ns, base):
                    return Workload(ns, pod, kind, base)
            deployment = base.rpartition("-")[0]   # <deployment>-<template hash>-<suffix>
            if deployment and self.state.has(DEPLOYMENT, ns, deployment):
                return Workload(ns, pod, "Deployment", deployment)
        if target.service:
            return Workload(ns, pod, "Service", target.service)
        return Workload(ns, pod, POD_KIND, pod)
