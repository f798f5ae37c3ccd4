"""What the agent knows of the cluster: a compact, indexed copy of the watched API objects.

Place in the data flow: agent/identity/k8s_watch.py (list + watch) calls `replace`/`apply` on a
ClusterState (it is the watcher's WatchSink); agent/identity/resolver.py reads it through the lookup
methods. Only the fields identity needs are kept, not whole objects.

Indexes: pod UID (and a static pod's config hash, which is what its cgroup path carries,
since its API "mirror" pod has a different UID) -> pod; pod IP -> pod (hostNetwork pods
excluded: their IP is the node's); ClusterIP -> service; EndpointSlice address -> endpoint
target (namespace, pod name, service) for pods on other nodes; ReplicaSet -> Deployment and
Job -> CronJob for owner chains; names of Deployments, DaemonSets and StatefulSets.

Deleted pods and services leave a tombstone stamped with `clock()`: lookups still find
them (flows that are draining keep their names), `deleted_for()` says how long ago they
went. A pod that vanishes from a re-list counts as deleted at that moment. Tombstones are
dropped after `keep_s` (or beyond `max_tombstones`), long after exporters stop exporting them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from meshlens.agent.identity.k8s_kinds import DAEMONSET, DEPLOYMENT, ENDPOINTSLICE, JOB, POD, REPLICASET, SERVICE, STATEFULSET

Key = Tuple[str, str]  # (namespace, name)
CONFIG_HASH = "kubernetes.io/config.hash"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    owner_kind: str          # the controller ownerReference, "" if none
    owner_name: str
    ips: Tuple[str, ...]
    host_network: bool
    config_hash: str = ""    # static pods
    template_hash: str = ""  # label pod-template-hash (Deployment pods)
    finished: bool = False   # phase Succeeded/Failed: its IP may already belong to another pod


@dataclass(frozen=True)
class EndpointTarget:
    namespace: str
    pod: str
    service: str


def _meta(obj: Dict[str, Any]) -> Dict[str, Any]:
    return obj.get("metadata") or {}


def _key(obj: Dict[str, Any]) -> Key:
    m = _meta(obj)
    return m.get("namespace", "") or "", m.get("name", "") or ""


def controller_of(obj: Dict[str, Any]) -> Tuple[str, str]:
    """(kind, name) of the controlling ownerReference (else the first one), ("", "") if none."""
    refs = _meta(obj).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return ref.get("kind", ""), ref.get("name", "")
    return (refs[0].get("kind", ""), refs[0].get("name", "")) if refs else ("", "")


def pod_info(obj: Dict[str, Any]) -> PodInfo:
    m, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = [p.get("ip", "") for p in status.get("podIPs") or []] or [status.get("podIP", "")]
    kind, name = controller_of(obj)
    return PodInfo(
        uid=m.get("uid", ""), namespace=m.get("namespace", ""), name=m.get("name", ""),
        owner_kind=kind, owner_name=name, ips=tuple(ip for ip in ips if ip),
        host_network=bool(spec.get("hostNetwork")),
        config_hash=(m.get("annotations") or {}).get(CONFIG_HASH, ""),
        template_hash=(m.get("labels") or {}).get("pod-template-hash", ""),
        finished=status.get("phase") in ("Succeeded", "Failed"),
    )


def service_ips(obj: Dict[str, Any]) -> Tuple[str, ...]:
    spec = obj.get("spec") or {}
    ips = spec.get("clusterIPs") or [spec.get("clusterIP", "")]
    return tuple(ip for ip in ips if ip and ip != "None")


def endpoint_targets(obj: Dict[str, Any]) -> Dict[str, EndpointTarget]:
    """address -> target pod of one EndpointSlice (endpoints without a Pod targetRef are skipped)."""
    service = (_meta(obj).get("labels") or {}).get(SERVICE_NAME_LABEL, "")
    out: Dict[str, EndpointTarget] = {}
    for ep in obj.get("endpoints") or []:
        ref = ep.get("targetRef") or {}
        if ref.get("kind") != "Pod":
            continue
        for addr in ep.get("addresses") or []:
            out[addr] = EndpointTarget(ref.get("namespace", "") or _meta(obj).get("namespace", ""), ref.get("name", ""), service)
    return out


class ClusterState:
    """Thread-safe: the watch threads write, the exporter's scrape threads read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep_s: float = 3600.0,
                 max_tombstones: int = 10_000) -> None:
        self._clock = clock
        self.keep_s = keep_s
        self.max_tombstones = max_tombstones
        self._lock = threading.RLock()
        self._pods: Dict[str, PodInfo] = {}                       # uid -> pod
        self._pods_by_key: Dict[Key, str] = {}                    # (ns, name) -> uid
        self._pod_tombs: Dict[str, Tuple[PodInfo, float]] = {}    # uid -> (pod, deleted at)
        self._services: Dict[Key, Tuple[str, ...]] = {}           # (ns, name) -> cluster IPs
        self._svc_tombs: Dict[Key, Tuple[Tuple[str, ...], float]] = {}
        self._slices: Dict[Key, Dict[str, EndpointTarget]] = {}
        self._controllers: Dict[str, Dict[Key, Tuple[str, str]]] = {REPLICASET: {}, JOB: {}}
        self._names: Dict[str, Set[Key]] = {DEPLOYMENT: set(), DAEMONSET: set(), STATEFULSET: set()}
        self._index_dirty = True
        self._by_uid: Dict[str, PodInfo] = {}
        self._by_ip: Dict[str, PodInfo] = {}
        self._by_cluster_ip: Dict[str, Key] = {}
        self._by_endpoint: Dict[str, EndpointTarget] = {}
        self._tomb_time: Dict[Key, float] = {}                    # (ns, name) -> latest deletion

    # -- WatchSink

    def replace(self, resource: str, objects: List[Dict[str, Any]]) -> None:
        with self._lock:
            now = self._clock()
            if resource == POD:
                fresh = {p.uid: p for p in map(pod_info, objects) if p.uid}
                for uid in set(self._pods) - set(fresh):
                    self._bury_pod(uid, now)
                for uid in fresh:
                    self._pod_tombs.pop(uid, None)
                self._pods = fresh
                self._pods_by_key = {(p.namespace, p.name): uid for uid, p in fresh.items()}
            elif resource == SERVICE:
                fresh_s = {_key(o): service_ips(o) for o in objects}
                for key in set(self._services) - set(fresh_s):
                    self._svc_tombs[key] = (self._services[key], now)
                for key in fresh_s:
                    self._svc_tombs.pop(key, None)
                self._services = fresh_s
            elif resource == ENDPOINTSLICE:
                self._slices = {_key(o): endpoint_targets(o) for o in objects}
            elif resource in self._controllers:
                self._controllers[resource] = {_key(o): controller_of(o) for o in objects}
            elif resource in self._names:
                self._names[resource] = {_key(o) for o in objects}
            self._changed(now)

    def apply(self, resource: str, event_type: str, obj: Dict[str, Any]) -> None:
        deleted = event_type == "DELETED"
        with self._lock:
            now = self._clock()
            key = _key(obj)
            if resource == POD:
                info = pod_info(obj)
                if deleted:
                    self._bury_pod(info.uid, now, info)
                else:
                    old_uid = self._pods_by_key.get(key)
                    if old_uid and old_uid != info.uid:   # same name, new pod (StatefulSet)
                        self._bury_pod(old_uid, now)
                    self._pods[info.uid] = info
                    self._pods_by_key[key] = info.uid
                    self._pod_tombs.pop(info.uid, None)
            elif resource == SERVICE:
                if deleted:
                    if key in self._services:
                        self._svc_tombs[key] = (self._services.pop(key), now)
                else:
                    self._services[key] = service_ips(obj)
                    self._svc_tombs.pop(key, None)
            elif resource == ENDPOINTSLICE:
                if deleted:
                    self._slices.pop(key, None)
                else:
                    self._slices[key] = endpoint_targets(obj)
            elif resource in self._controllers:
                if deleted:
                    self._controllers[resource].pop(key, None)
                else:
                    self._controllers[resource][key] = controller_of(obj)
            elif resource in self._names:
                (self._names[resource].discard if deleted else self._names[resource].add)(key)
            self._changed(now)

    def count(self, resource: str) -> int:
        with self._lock:
            if resource == POD:
                return len(self._pods)
            if resource == SERVICE:
                return len(self._services)
            if resource == ENDPOINTSLICE:
                return len(self._slices)
            if resource in self._controllers:
                return len(self._controllers[resource])
            return len(self._names.get(resource, ()))

    def _bury_pod(self, uid: str, now: float, info: Optional[PodInfo] = None) -> None:
        pod = self._pods.pop(uid, None) or info
        if pod is None:
            return
        if self._pods_by_key.get((pod.namespace, pod.name)) == uid:
            del self._pods_by_key[(pod.namespace, pod.name)]
        self._pod_tombs[uid] = (pod, now)

    def _changed(self, now: float) -> None:
        self._prune(now)
        self._index_dirty = True

    def _prune(self, now: float) -> None:
        for tombs in (self._pod_tombs, self._svc_tombs):
            old = [k for k, (_, t) in tombs.items() if now - t > self.keep_s]
            for k in old:
                del tombs[k]
            while len(tombs) > self.max_tombstones:   # dicts keep insertion order: oldest first
                del tombs[next(iter(tombs))]

    def _reindex(self) -> None:
        """Rebuild the lookup indexes (on the first lookup after a change). Live objects win over
        tombstones for the same key, and running pods over finished ones (a Succeeded pod keeps
        its podIP in status after the IP went to another pod): an IP reused names the new pod."""
        if not self._index_dirty:
            return
        by_uid: Dict[str, PodInfo] = {}
        by_ip: Dict[str, PodInfo] = {}
        tomb_time: Dict[Key, float] = {}
        for pod, when in self._pod_tombs.values():
            key = (pod.namespace, pod.name)
            tomb_time[key] = max(when, tomb_time.get(key, when))
            by_uid[pod.uid] = pod
            if pod.config_hash:
                by_uid[pod.config_hash] = pod
            if not pod.host_network:
                by_ip.update((ip, pod) for ip in pod.ips)
        live = sorted(self._pods.values(), key=lambda p: not p.finished)   # running pods last: they win
        for pod in live:
            by_uid[pod.uid] = pod
            if pod.config_hash:
                by_uid[pod.config_hash] = pod
            if not pod.host_network:
                by_ip.update((ip, pod) for ip in pod.ips)
        by_cluster_ip: Dict[str, Key] = {}
        for key, (ips, _) in self._svc_tombs.items():
            by_cluster_ip.update((ip, key) for ip in ips)
        for key, ips in self._services.items():
            by_cluster_ip.update((ip, key) for ip in ips)
        by_endpoint: Dict[str, EndpointTarget] = {}
        ambiguous: Set[str] = set()
        for targets in self._slices.values():
            for addr, target in targets.items():
                seen = by_endpoint.get(addr)
                if seen is not None and (seen.namespace, seen.pod) != (target.namespace, target.pod):
                    ambiguous.add(addr)   # hostNetwork pods share their node's address
                by_endpoint[addr] = target
        for addr in ambiguous:
            del by_endpoint[addr]
        self._by_uid, self._by_ip, self._tomb_time = by_uid, by_ip, tomb_time
        self._by_cluster_ip, self._by_endpoint = by_cluster_ip, by_endpoint
        self._index_dirty = False

    # -- lookups (identity.py)

    def pod_by_uid(self, uid: str) -> Optional[PodInfo]:
        """A pod on this node by UID or static-pod config hash, live or tombstoned."""
        with self._lock:
            self._reindex()
            return self._by_uid.get(uid)

    def pod_by_ip(self, ip: str) -> Optional[PodInfo]:
        with self._lock:
            self._reindex()
            return self._by_ip.get(ip)

    def endpoint_by_ip(self, ip: str) -> Optional[EndpointTarget]:
        with self._lock:
            self._reindex()
            return self._by_endpoint.get(ip)

    def service_by_ip(self, ip: str) -> Optional[Key]:
        with self._lock:
            self._reindex()
            return self._by_cluster_ip.get(ip)

    def controller(self, resource: str, namespace: str, name: str) -> Optional[Tuple[str, str]]:
        """The (kind, name) controlling a ReplicaSet or Job; None if that object is unknown."""
        with self._lock:
            return self._controllers[resource].get((namespace, name))

    def has(self, resource: str, namespace: str, name: str) -> bool:
        """Is there a Deployment / DaemonSet / StatefulSet of that name?"""
        with self._lock:
            return (namespace, name) in self._names[resource]

    def pod_deleted_for(self, namespace: str, name: str) -> Optional[float]:
        """Seconds since the pod of that name was deleted; None if it exists or was never seen."""
        with self._lock:
            if (namespace, name) in self._pods_by_key:
                return None
            self._reindex()
            when = self._tomb_time.get((namespace, name))
            return self._clock() - when if when is not None else None

    def service_deleted_for(self, namespace: str, name: str) -> Optional[float]:
        with self._lock:
            if (namespace, name) in self._services:
                return None
            tomb = self._svc_tombs.get((namespace, name))
            return self._clock() - tomb[1] if tomb else None
