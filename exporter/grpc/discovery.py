"""Where the relay finds its agents in Kubernetes: the ready endpoints of the agents'
headless Service, read from its EndpointSlices through the official client.

Place in the data flow: `meshlens relay --agents-service [NAMESPACE/]NAME:PORT` ->
ServiceAgents.run() lists the Service's EndpointSlices every `interval_s` -> the addresses
(HOST:PORT, one per ready endpoint, named by the endpoint's node) -> Relay.sync().
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

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


@dataclass
class ServiceAgents:
    """The agent addresses behind one headless Service."""

    api: object                     # kubernetes.client.ApiClient
    namespace: str
    name: str
    port: int
    interval_s: float = 10.0

    def addresses(self) -> List[str]:
        """Ready endpoints of the Service's slices, sorted (raises the client's ApiException)."""
        from kubernetes import client as k8s

        slices = k8s.DiscoveryV1Api(self.api).list_endpoint_slice_for_all_namespaces(
            field_selector=f"metadata.namespace={self.namespace}", label_selector=f"{SERVICE_LABEL}={self.name}")
        out = set()
        for s in slices.items:
            meta = s.metadata
            if meta.namespace != self.namespace or (meta.labels or {}).get(SERVICE_LABEL) != self.name:
                continue
            for ep in s.endpoints or ():
                cond = ep.conditions
                if cond is not None and cond.ready is False:
                    continue
                for ip in ep.addresses or ():
                    out.add(_host(ip, self.port))
        return sorted(out)

    def run(self, sync: Callable[[List[str]], None], stop: threading.Event) -> None:
        """Call sync(addresses) now and after every interval, until `stop`; API errors keep
        the last list (logged), so a restarting API server never empties the relay."""
        while True:
            try:
                sync(self.addresses())
            except Exception as exc:  # noqa: BLE001 - ApiException, connection errors
                log.warning("agents service %s/%s: %s", self.namespace, self.name, exc)
            if stop.wait(self.interval_s):
                return


def service_agents(spec: str, kubeconfig: Optional[str] = None, host: Optional[str] = None) -> ServiceAgents:
    from meshlens.agent.identity.k8s_watch import api_client

    ns, name, port = parse_service(spec)
    return ServiceAgents(api_client(kubeconfig, in_cluster=None if kubeconfig is None else False, host=host),
                         ns, name, port)
