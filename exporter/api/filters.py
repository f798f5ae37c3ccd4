"""Query-parameter parsing for the REST API: times (RFC 3339 or relative `5m`), HTTP status
specs (`404`, `5+`), CIDRs, `kind/name` resources, and FlowFilter, the AND of every flow
filter of one request (named like `hubble observe` flags).

Place in the data flow: exporter/api/app.py parses the query string with these helpers
(a bad value is a ValueError, answered as 400 with the parameter's name) and hands the
filter to exporter/api/flows.py and exporter/api/tap.py.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Tuple, Union

from meshlens.agent.identity.model import Workload

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_REL = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION_S = 366 * 86400.0


class ParamError(ValueError):
    """A query parameter with a bad value: answered as 400 naming the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def parse_duration(param: str, text: str) -> float:
    """'30s', '5m', '1.5h', '250ms' -> seconds (positive, at most a year)."""
    m = _REL.match(text.strip())
    if not m:
        raise ParamError(param, f"want a duration like 30s, 5m or 1h, got {text!r}")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise ParamError(param, f"duration must be positive and at most a year, got {text!r}")
    return seconds


def parse_time(param: str, text: str, now: float) -> float:
    """RFC 3339 ('2026-12-01T08:00:00Z') or relative ('5m' = five minutes ago) -> Unix time."""
    text = text.strip()
    if _REL.match(text):
        return now - parse_duration(param, text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ParamError(param, f"want RFC 3339 (2026-12-01T08:00:00Z) or a relative time like 5m, got {text!r}") from None
    if dt.tzinfo is None:
        raise ParamError(param, f"RFC 3339 time needs a zone (Z or +hh:mm), got {text!r}")
    return dt.astimezone(timezone.utc).timestamp()


@dataclass(frozen=True)
class StatusSpec:
    """`404` (that code) or `5+` (any code starting with 5), as `hubble observe --http-status`."""

    prefix: str

    def matches(self, status: int) -> bool:
        return str(status).startswith(self.prefix)


def parse_status(param: str, text: str) -> StatusSpec:
    t = text.strip()
    if re.fullmatch(r"[1-5]\d{2}", t):
        return StatusSpec(t)
    if re.fullmatch(r"[1-5]\d{0,1}\+", t):
        return StatusSpec(t[:-1])
    raise ParamError(param, f"want a status code (404) or a prefix with + (5+, 40+), got {text!r}")


def parse_cidr(param: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ParamError(param, f"want an IP address or CIDR (10.0.0.0/8, fd00::/64), got {text!r}") from None


def ip_in(address: str, net: IPNetwork) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version == net.version and ip in net


# Kubernetes-style resource words (as `linkerd viz stat deploy/web` and SMI paths take them)
# -> the owner kind meshlens names workloads with.
KINDS = {
    "deploy": "Deployment", "deployment": "Deployment", "deployments": "Deployment",
    "sts": "StatefulSet", "statefulset": "StatefulSet", "statefulsets": "StatefulSet",
    "ds": "DaemonSet", "daemonset": "DaemonSet", "daemonsets": "DaemonSet",
    "job": "Job", "jobs": "Job", "cronjob": "CronJob", "cronjobs": "CronJob",
    "po": "Pod", "pod": "Pod", "pods": "Pod",
    "process": "process", "processes": "process",
    "external": "external", "svc": "Service", "service": "Service", "services": "Service",
}


@dataclass(frozen=True)
class Resource:
    """`deploy/web`, `pod/web-1`, `web` (any kind): matches a Workload."""

    kind: Optional[str]     # owner kind ("Pod" means: match the pod name), None = any
    name: str

    def matches(self, w: Workload) -> bool:
        if self.kind == "Pod":
            return w.pod == self.name
        if self.kind is not None and w.owner_kind != self.kind:
            return False
        return w.owner_name == self.name or (self.kind is None and w.pod == self.name)


def parse_resource(param: str, text: str) -> Resource:
    t = text.strip()
    if not t:
        raise ParamError(param, "empty resource")
    if "/" in t:
        kind, _, name = t.partition("/")
        k = KINDS.get(kind.lower())
        if k is None:
            raise ParamError(param, f"unknown kind {kind!r} (use deploy, sts, ds, job, cronjob, pod, process, svc)")
        if not name:
            raise ParamError(param, f"missing name after {kind}/")
        return Resource(k, name)
    return Resource(None, t)


def _pod_spec(text: str) -> Tuple[Optional[str], str]:
    """hubble's `--pod [namespace/]pod-name-prefix`."""
    if "/" in text:
        ns, _, pod = text.partition("/")
        return ns, pod
    return None, text


@dataclass(frozen=True)
class Side:
    """Filters on one end of a flow (all given ones must match)."""

    namespace: Optional[str] = None
    pod: Optional[str] = None          # prefix, optionally "namespace/prefix"
    workload: Optional[str] = None     # owner name (or kind/name)
    ip: Optional[IPNetwork] = None

    def empty(self) -> bool:
        return self.namespace is None and self.pod is None and self.workload is None and self.ip is None

    def matches(self, w: Workload, address: Optional[str]) -> bool:
        if self.namespace is not None and w.namespace != self.namespace:
            return False
        if self.pod is not None:
            ns, prefix = _pod_spec(self.pod)
            if ns is not None and w.namespace != ns:
                return False
            if not w.pod.startswith(prefix) or not w.pod:
                return False
        if self.workload is not None:
            res = parse_resource("workload", self.workload)
            if not res.matches(w):
                return False
        if self.ip is not None and (address is None or not ip_in(address, self.ip)):
            return False
        return True


@dataclass(frozen=True)
class FlowFilter:
    """Every filter of one request, ANDed. `either` matches a flow when either end matches
    (hubble's `--pod`, `--namespace`, `--ip`); `source`/`destination` match the client and
    the server end (`--from-pod`, `--to-pod`, ...)."""

    either: Side = Side()
    source: Side = Side()
    destination: Side = Side()
    port: Optional[int] = None
    protocol: Optional[str] = None        # tcp | udp | http (TCP flows L7 saw HTTP on) | dns
    direction: Optional[str] = None       # inbound | outbound (as the local pod sees it)
    http_status: Optional[StatusSpec] = None

    def matches_ends(self, client: Workload, client_ip: Optional[str], server: Workload,
                     server_ip: Optional[str]) -> bool:
        if not self.either.empty() and not (self.either.matches(client, client_ip)
                                            or self.either.matches(server, server_ip)):
            return False
        return self.source.matches(client, client_ip) and self.destination.matches(server, server_ip)


DIRECTIONS = {"inbound": "inbound", "ingress": "inbound", "outbound": "outbound", "egress": "outbound"}


def parse_direction(param: str, text: str) -> str:
    d = DIRECTIONS.get(text.strip().lower())
    if d is None:
        raise ParamError(param, f"want inbound or outbound (ingress/egress), got {text!r}")
    return d


PROTOCOLS = ("tcp", "udp", "http", "dns")


def parse_protocol(param: str, text: str) -> str:
    p = text.strip().lower()
    if p not in PROTOCOLS:
        raise ParamError(param, f"want one of {', '.join(PROTOCOLS)}, got {text!r}")
    return p
