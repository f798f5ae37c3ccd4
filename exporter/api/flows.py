"""Per-pod flows over a window: one record per (local pod/workload, peer, direction, protocol,
server port), from the flow table's rollups, with the HTTP summary of that edge where L7 saw it,
plus one `udp` record per (local pod, DNS server) with the DNS summary (lookups answered by
response code, latency; UDP byte counts are not tracked, so those fields are 0).

Place in the data flow: exporter/api/window.Window (live snapshot minus a history record) ->
this module (identity names, subtraction, join with HTTP series, filters, cursor pages) ->
plain dicts that match exporter/api/models.Flow, serialised by exporter/api/app.py.

HTTP join: client-side series carry the server's address and port, so an outbound flow gets
exactly its own requests. Server-side series carry no client address: an inbound flow gets
the server's requests on that port only when it is the one inbound flow there in the
answer; with several clients on one port the summary is left out (null), never guessed.
"""
from __future__ import annotations

import base64
import bisect
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from meshlens.agent.aggregate.flows import OVERFLOW, FlowSnapshot, Rollup, RollupKey
from meshlens.agent.identity.model import Workload
from meshlens.agent.sources.histogram import LATENCY_BUCKETS
from meshlens.agent.sources.l7.structs import DURATION_BOUNDS_S
from meshlens.exporter.api.filters import FlowFilter, ParamError
from meshlens.exporter.api.window import Window, add_into, quantiles_ms, sub, sub_counts

_COUNTERS = ("opened", "closed", "bytes_sent", "bytes_received", "segs_retrans", "rsts_sent", "rsts_received")


@dataclass
class _Acc:
    local: Workload
    peer: Workload
    peer_ip: str
    direction: str
    port: int
    counts: Dict[str, int] = field(default_factory=lambda: {c: 0 for c in _COUNTERS})
    failures: Dict[str, int] = field(default_factory=dict)
    active: int = 0
    rtt: List[int] = field(default_factory=list)
    connect: List[int] = field(default_factory=list)
    http: Optional["_Http"] = None
    protocol: str = "tcp"
    dns: Optional["_Dns"] = None


@dataclass
class _Dns:
    lookups: int = 0
    answers: int = 0
    by_rcode: Dict[str, int] = field(default_factory=dict)
    duration: List[int] = field(default_factory=list)
    bounds: Sequence[float] = ()

    def as_dict(self) -> Dict[str, object]:
        return {"lookups": self.lookups, "answers": self.answers, "by_rcode": dict(sorted(self.by_rcode.items())),
                "latency_ms": quantiles_ms(self.bounds, self.duration)}


@dataclass
class _Http:
    requests: int = 0
    errors: int = 0
    by_status: Dict[str, int] = field(default_factory=dict)
    duration: List[int] = field(default_factory=list)

    def add(self, status: int, n: int, counts: Sequence[int]) -> None:
        if n <= 0:
            return
        self.requests += n
        if status >= 500:
            self.errors += n
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + n
        self.duration = add_into(self.duration, counts)

    def as_dict(self) -> Dict[str, object]:
        return {"requests": self.requests, "errors": self.errors,
                "by_status": dict(sorted(self.by_status.items())),
                "latency_ms": quantiles_ms(DURATION_BOUNDS_S, self.duration)}


def workload_dict(w: Workload, ip: Optional[str] = None) -> Dict[str, object]:
    d: Dict[str, object] = {"namespace": w.namespace, "pod": w.pod, "workload_kind": w.owner_kind,
                            "workload": w.owner_name}
    if ip is not None:
        d["ip"] = ip
    return d


def _delta_rollup(acc: _Acc, cur: Rollup, old: Optional[Rollup]) -> bool:
    """Add cur - old to acc; True if anything happened in the window (or a connection is open)."""
    changed = False
    for c in _COUNTERS:
        d = sub(getattr(cur, c), getattr(old, c) if old else None)
        if d:
            acc.counts[c] += d
            changed = True
    for reason, n in cur.connect_failures.items():
        d = sub(n, old.connect_failures.get(reason) if old else None)
        if d:
            acc.failures[reason] = acc.failures.get(reason, 0) + d
            changed = True
    acc.active += cur.active
    acc.rtt = add_into(acc.rtt, sub_counts(cur.rtt.counts, old.rtt.counts if old else None))
    acc.connect = add_into(acc.connect, sub_counts(cur.connect_latency.counts, old.connect_latency.counts if old else None))
    return changed or cur.active > 0


def _http_series(window: Window) -> Tuple[Dict[tuple, _Http], Dict[tuple, _Http]]:
    """(client view keyed by (local, server ip, port), server view keyed by (local, port))."""
    client: Dict[tuple, _Http] = {}
    server: Dict[tuple, _Http] = {}
    cur = getattr(window.area("http"), "series", None) or {}
    old = getattr(window.base_area("http"), "series", None) or {}
    ident = window.identity
    for key, st in cur.items():
        prev = old.get(key)
        n = sub(st.count, prev.count if prev else None)
        if n <= 0:
            continue
        counts = sub_counts(st.duration.counts, prev.duration.counts if prev else None)
        local = ident.local(key.cgroup_id, key.netns, key.process)
        if key.role == "client":
            client.setdefault((local, key.server_address, key.server_port), _Http()).add(key.status, n, counts)
        elif key.role == "server":
            server.setdefault((local, key.server_port), _Http()).add(key.status, n, counts)
    return client, server


def flow_records(window: Window, flt: FlowFilter, local_pod: Optional[Tuple[str, str]] = None) -> List[Dict[str, object]]:
    """Every matching flow as a dict, sorted by the cursor key."""
    return [_record(a) for a in flow_accs(window, flt, local_pod)]


def flow_accs(window: Window, flt: FlowFilter, local_pod: Optional[Tuple[str, str]] = None) -> List[_Acc]:
    """Matching flows, sorted by the cursor key; turned into dicts only for the page asked
    (quantiles and dicts are most of the cost at 10k rollups)."""
    flows = window.area("tcp")
    if not isinstance(flows, FlowSnapshot):
        return []
    base = window.base_area("tcp")
    old_rollups: Dict[RollupKey, Rollup] = base.rollups if isinstance(base, FlowSnapshot) else {}
    ident = window.identity
    accs: Dict[tuple, _Acc] = {}
    for key, r in flows.rollups.items():
        if key.direction == OVERFLOW:
            continue
        local = ident.local(key.cgroup_id, key.netns, key.process)
        k = (local, key.peer_address, key.direction, key.server_port)
        acc = accs.get(k)
        fresh = acc is None
        if acc is None:
            acc = _Acc(local, ident.peer(key.peer_address), key.peer_address, key.direction, key.server_port)
        if _delta_rollup(acc, r, old_rollups.get(key)) and fresh:
            accs[k] = acc
    client_http, server_http = _http_series(window)
    inbound_per_port: Dict[tuple, int] = {}
    for acc in accs.values():
        if acc.direction == "inbound":
            inbound_per_port[(acc.local, acc.port)] = inbound_per_port.get((acc.local, acc.port), 0) + 1
    accs.update(_dns_accs(window))
    out = []
    for acc in accs.values():
        if local_pod is not None and (acc.local.namespace, acc.local.pod) != local_pod:
            continue
        if acc.direction == "outbound":
            acc.http = client_http.get((acc.local, acc.peer_ip, acc.port))
        elif acc.direction == "inbound" and inbound_per_port[(acc.local, acc.port)] == 1:
            acc.http = server_http.get((acc.local, acc.port))
        if _keep(acc, flt):
            out.append(acc)
    out.sort(key=acc_key)
    return out


def _dns_accs(window: Window) -> Dict[tuple, _Acc]:
    """One udp/dns record per (local workload, DNS server, port), from the DNS area."""
    cur = getattr(window.area("dns"), "series", None) or {}
    old = getattr(window.base_area("dns"), "series", None) or {}
    ident = window.identity
    out: Dict[tuple, _Acc] = {}
    for key, st in cur.items():
        prev = old.get(key)
        n = sub(st.count, prev.count if prev else None)
        if n <= 0:
            continue
        local = ident.local(key.cgroup_id, key.netns, key.process)
        k = (local, key.server_address, "outbound", key.server_port, "udp")
        acc = out.get(k)
        if acc is None:
            acc = out[k] = _Acc(local, ident.peer(key.server_address), key.server_address, "outbound",
                                key.server_port, protocol="udp", dns=_Dns(bounds=st.duration.bounds))
        d = acc.dns
        assert d is not None
        d.lookups += n
        d.answers += sub(st.answers, prev.answers if prev else None)
        d.by_rcode[key.response_code] = d.by_rcode.get(key.response_code, 0) + n
        d.duration = add_into(d.duration, sub_counts(st.duration.counts, prev.duration.counts if prev else None))
    return out


def _keep(acc: _Acc, flt: FlowFilter) -> bool:
    if flt.direction is not None and acc.direction != flt.direction:
        return False
    if flt.port is not None and acc.port != flt.port:
        return False
    if flt.protocol == "http" and acc.http is None:
        return False
    if flt.protocol in ("udp", "dns") and acc.protocol != "udp":
        return False
    if flt.protocol == "tcp" and acc.protocol != "tcp":
        return False
    if flt.http_status is not None:
        if acc.http is None or not any(flt.http_status.matches(int(s)) for s in acc.http.by_status):
            return False
    if acc.direction == "inbound":
        return flt.matches_ends(acc.peer, acc.peer_ip, acc.local, None)
    return flt.matches_ends(acc.local, None, acc.peer, acc.peer_ip)


def _record(acc: _Acc) -> Dict[str, object]:
    c = acc.counts
    return {
        "local": workload_dict(acc.local),
        "peer": workload_dict(acc.peer, acc.peer_ip),
        "direction": acc.direction,
        "protocol": acc.protocol,
        "l7": "http" if acc.http else ("dns" if acc.dns else None),
        "port": acc.port,
        "bytes_sent": c["bytes_sent"],
        "bytes_received": c["bytes_received"],
        "connections_opened": c["opened"],
        "connections_closed": c["closed"],
        "connections_active": acc.active,
        "connect_failures": dict(sorted(acc.failures.items())),
        "retransmits": c["segs_retrans"],
        "resets_sent": c["rsts_sent"],
        "resets_received": c["rsts_received"],
        "rtt_ms": quantiles_ms(LATENCY_BUCKETS, acc.rtt),
        "connect_latency_ms": quantiles_ms(LATENCY_BUCKETS, acc.connect),
        "http": acc.http.as_dict() if acc.http else None,
        "dns": acc.dns.as_dict() if acc.dns else None,
    }


def acc_key(a: _Acc) -> List[object]:
    """The cursor key: local pod/workload, direction, peer address, port, protocol (unique per flow)."""
    return [a.local.namespace, a.local.pod, a.local.owner_kind, a.local.owner_name, a.direction, a.peer_ip, a.port,
            a.protocol]


def encode_cursor(key: List[object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> List[object]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ParamError("cursor", "not a cursor this API handed out") from None
    if (not isinstance(key, list) or len(key) != 8 or not all(isinstance(x, str) for x in key[:6])
            or not isinstance(key[6], int) or isinstance(key[6], bool) or not isinstance(key[7], str)):
        raise ParamError("cursor", "not a cursor this API handed out")
    return key


def page(accs: List[_Acc], limit: int, cursor: Optional[str]) -> Tuple[List[Dict[str, object]], Optional[str]]:
    """Flows after the cursor, at most `limit`, as dicts, and the next page's cursor (None at the end)."""
    start = 0
    if cursor:
        after = decode_cursor(cursor)
        keys = [acc_key(a) for a in accs]
        start = bisect.bisect_right(keys, after)
    chunk = accs[start:start + limit]
    more = start + limit < len(accs)
    return [_record(a) for a in chunk], (encode_cursor(acc_key(chunk[-1])) if more and chunk else None)
