"""Where the relay finds its agents in Kubernetes: the ready endpoints of the agents'
headless Service, kept current by a list + watch of its EndpointSlices.

Place in the data flow: `meshlens relay --agents-service [NAMESPACE/]NAME:PORT` ->
ServiceAgents.run(): agent/identity/k8s_watch.KubeWatcher (the official client; the Service's
namespace only, label `kubernetes.io/service-name=NAME`, so the relay's namespaced Role
suffices) -> ServiceSlices (the slices, as a WatchSink) -> the addresses (HOST:PORT, one per
ready endpoint) -> Relay.sync(), at once on every change. An API outage keeps the last list
(the watcher never clears its sink on an error) and resumes where it stopped.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from meshlens.exporter.api.filters import ParamError

log = logging.getLogger("meshlens.relay")

SERVICE_LABEL = "kubernetes.io/service-name"


def parse_service(text: str) -> Tuple[str, str, int]:
    """'[namespace/]name:port' -> (namespace, name, port); namespace defaults to kube-system."""
    spec, sep, port_s = text.strip().rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536 or not spec:
        raise ParamError("agents_service", f"want [NAMESPACE/]NAME:PORT, got {text!r}")
    ns, _, name = spec.rpartition("/")
    return ns or "kube-system", name, int(port_s)


def _host(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ServiceSlices:
    """The EndpointSlices of one Service (a WatchSink); calls `sync` with the ready agent
    addresses whenever they change."""

    def __init__(self, namespace: str, name: str, port: int, sync: Callable[[List[str]], None]) -> None:
        self.namespace, self.name, self.port = namespace, name, port
        self._sync = sync
        self._slices: Dict[str, Dict[str, Any]] = {}
        self._last: Optional[List[str]] = None
        self._lock = threading.Lock()

    def _mine(self, obj: Dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return meta.get("namespace") == self.namespace and (meta.get("labels") or {}).get(SERVICE_LABEL) == self.name

    def replace(self, resource: str, objects: List[Dict[str, Any]]) -> None:
        with self._lock:
            self._slices = {o["metadata"]["name"]: o for o in objects if self._mine(o)}
        self._changed()

    def apply(self, resource: str, event_type: str, obj: Dict[str, Any]) -> None:
        if not self._mine(obj):
            return
        with self._lock:
            if event_type == "DELETED":
                self._slices.pop(obj["metadata"]["name"], None)
            else:
                self._slices[obj["metadata"]["name"]] = obj
        self._changed()

    def count(self, resource: str) -> int:
        return len(self._slices)

    def addresses(self) -> List[str]:
        """Ready endpoints of the slices, sorted (an endpoint without conditions is ready)."""
        out = set()
        with self._lock:
            slices = list(self._slices.values())
        for s in slices:
            for ep in s.get("endpoints") or ():
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                for ip in ep.get("addresses") or ():
                    out.add(_host(ip, self.port))
        return sorted(out)

    def _changed(self) -> None:
        now = self.addresses()
        if now != self._last:
            self._last = now
            self._sync(now)


@dataclass
class ServiceAgents:
    """The agent addresses behind one headless Service."""

    api: object                     # kubernetes.client.ApiClient
    namespace: str
    name: str
    port: int

    def watch_config(self):
        from meshlens.agent.identity.k8s_watch import ENDPOINTSLICE, WatchConfig

        return WatchConfig(resources=(ENDPOINTSLICE,), namespace=self.namespace,
                           label_selector=f"{SERVICE_LABEL}={self.name}")

    def run(self, sync: Callable[[List[str]], None], stop: threading.Event) -> None:
        """Call sync(addresses) after the first list and on every change, until `stop`."""
        from meshlens.agent.identity.k8s_watch import KubeWatcher

        watcher = KubeWatcher(self.api, ServiceSlices(self.namespace, self.name, self.port, sync),
                              self.watch_config())
        watcher.start()
        try:
            stop.wait()
        finally:
            watcher.stop()


def service_agents(spec: str, kubeconfig: Optional[str] = None, host: Optional[str] = None) -> ServiceAgents:
    from meshlens.agent.identity.k8s_watch import api_client

    ns, name, port = parse_service(spec)
    return ServiceAgents(api_client(kubeconfig, in_cluster=None if kubeconfig is None else False, host=host),
                         ns, name, port)
