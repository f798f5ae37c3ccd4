"""Kernel facts to Observer messages, and the request filters applied to them.

Place in the data flow: connection events (agent/sources/tcp/facts.ConnEvent, follow mode),
sampled HTTP exchanges (agent/sources/l7/http.TapRecord, the tap) and DNS lookups
(agent/sources/l7/dns.DnsLookup, while followed) are named through the identity view and turned into `Flow` messages here (exporter/grpc/observer.py calls it);
the GetFlows whitelist/blacklist are compiled here into exporter/api/filters.FlowFilter, the
REST flows endpoint's own filter, so a filter means the same on both surfaces. The relay
(exporter/grpc/relay.py) applies the same compiled filters to the merged stream.

Time: the kernel stamps records with CLOCK_MONOTONIC; `wall_ns()` moves them to Unix time
with one reading of both clocks, so flows from several nodes (NTP-synchronised) merge in order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from google.protobuf import field_mask_pb2

from meshlens.agent.identity.model import IdentityView, Workload
from meshlens.exporter.api import filters as F
from meshlens.exporter.proto import observer_pb2 as pb

DIRECTION = {"outbound": pb.EGRESS, "inbound": pb.INGRESS}
DIRECTION_NAME = {pb.EGRESS: "outbound", pb.INGRESS: "inbound"}
UNKNOWN_PEER = Workload("", "", "unknown", "unknown")


def wall_ns(mono_ns: int, now_wall_ns: Optional[int] = None, now_mono_ns: Optional[int] = None) -> int:
    """A CLOCK_MONOTONIC stamp as Unix time in nanoseconds."""
    w = time.time_ns() if now_wall_ns is None else now_wall_ns
    m = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    return w - (m - mono_ns)


def endpoint(w: Workload, ip: str, port: int) -> pb.Endpoint:
    return pb.Endpoint(namespace=w.namespace, pod_name=w.pod, workload_name=w.owner_name,
                       workload_kind=w.owner_kind, ip=ip, port=port)


def workload_of(e: pb.Endpoint) -> Workload:
    return Workload(e.namespace, e.pod_name, e.workload_kind, e.workload_name)


def response(flow: pb.Flow) -> pb.GetFlowsResponse:
    r = pb.GetFlowsResponse(flow=flow, node_name=flow.node_name)
    r.time.CopyFrom(flow.time)
    return r


def conn_flow(ev, identity: IdentityView, node: str, t_ns: int) -> pb.Flow:
    """One ConnEvent (open | close | connect_fail) as an L4 flow; the source is the client."""
    key = ev.key
    local = identity.local(key.cgroup_id, key.netns, key.process)
    peer = identity.peer(ev.peer_address) if ev.peer_address else UNKNOWN_PEER
    mine = endpoint(local, ev.local_address, ev.local_port)
    theirs = endpoint(peer, ev.peer_address, ev.peer_port)
    inbound = key.direction == "inbound"
    src, dst = (theirs, mine) if inbound else (mine, theirs)
    l4 = pb.Layer4(protocol="TCP", event=ev.type, bytes_sent=ev.bytes_sent, bytes_received=ev.bytes_received,
                   duration_seconds=ev.duration_s, connect_latency_seconds=ev.connect_latency_s,
                   rtt_seconds=ev.rtt_s or (ev.connect_latency_s if key.direction == "outbound" else 0.0),
                   reason=ev.reason, pid=ev.pid)
    f = pb.Flow(node_name=node, type=pb.L4, source=src, destination=dst,
                traffic_direction=DIRECTION.get(key.direction, pb.TRAFFIC_DIRECTION_UNKNOWN), l4=l4)
    f.time.FromNanoseconds(t_ns)
    f.summary = f"TCP {ev.type}" + (f" {ev.reason}" if ev.reason else "") + (
        f" sent={ev.bytes_sent} received={ev.bytes_received}" if ev.type == "close" else "")
    return f


def http_flows(rec, identity: IdentityView, node: str, t_ns: int) -> Tuple[pb.Flow, pb.Flow]:
    """One sampled HTTP exchange (TapRecord) as Hubble does it: the request (client to
    server) at `t_ns`, and the response (server to client, is_reply) one latency later."""
    key = rec.key
    local = identity.local(key.cgroup_id, key.netns, key.process)
    peer = identity.peer(rec.peer_address) if rec.peer_address else UNKNOWN_PEER
    if key.role == "server":
        client = endpoint(peer, rec.client_address or rec.peer_address, rec.client_port)
        server, direction = endpoint(local, key.server_address, key.server_port), "inbound"
    else:
        client = endpoint(local, rec.client_address, rec.client_port)
        server, direction = endpoint(peer, key.server_address, key.server_port), "outbound"
    route = key.route or "[DEFAULT]"
    req_b = -1 if rec.request_body is None else rec.request_body
    resp_b = -1 if rec.response_body is None else rec.response_body
    req = pb.Flow(node_name=node, type=pb.L7, source=client, destination=server,
                  traffic_direction=DIRECTION[direction],
                  l7=pb.Layer7(http=pb.HTTP(method=key.method, route=route, request_bytes=req_b)),
                  summary=f"HTTP {key.method} {route}")
    req.time.FromNanoseconds(t_ns)
    resp = pb.Flow(node_name=node, type=pb.L7, source=server, destination=client,
                   traffic_direction=DIRECTION[direction], is_reply=True,
                   l7=pb.Layer7(http=pb.HTTP(method=key.method, route=route, code=key.status,
                                             latency_seconds=rec.duration_s, request_bytes=req_b,
                                             response_bytes=resp_b)),
                   summary=f"HTTP {key.status} {key.method} {route} {rec.duration_s * 1000:.3f}ms")
    resp.time.FromNanoseconds(t_ns + int(rec.duration_s * 1e9))
    return req, resp


def dns_flow(lk, identity: IdentityView, node: str, t_ns: int) -> pb.Flow:
    """One DnsLookup (agent/sources/l7/dns.py) as Hubble shows it: an answer (server to the
    client, is_reply) at its arrival, or an unanswered query (client to server, timed_out)."""
    local = identity.local(lk.cgroup_id, lk.netns, lk.process)
    peer = identity.peer(lk.server_address) if lk.server_address else UNKNOWN_PEER
    client = endpoint(local, lk.client_address, lk.client_port)
    server = endpoint(peer, lk.server_address, lk.server_port)
    dns = pb.DNS(query=lk.query, qtype=lk.qtype, rcode=lk.rcode, latency_seconds=lk.latency_s,
                 answer_count=lk.answers, timed_out=not lk.answered, id=lk.txid)
    if lk.answered:
        f = pb.Flow(node_name=node, type=pb.L7, source=server, destination=client, traffic_direction=pb.EGRESS,
                    is_reply=True, l7=pb.Layer7(dns=dns),
                    summary=f"DNS Answer {lk.query} {lk.qtype} {lk.rcode} answers={lk.answers} "
                            f"{lk.latency_s * 1000:.3f}ms")
    else:
        f = pb.Flow(node_name=node, type=pb.L7, source=client, destination=server, traffic_direction=pb.EGRESS,
                    l7=pb.Layer7(dns=dns), summary=f"DNS Query {lk.query} {lk.qtype} unanswered (timeout)")
    f.time.FromNanoseconds(t_ns)
    return f


# ---- filters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Compiled:
    """One request filter: the REST FlowFilter plus the fields only the stream has."""

    flow: F.FlowFilter
    node_name: str = ""
    type: int = pb.UNKNOWN_TYPE

    def matches(self, f: pb.Flow) -> bool:
        if self.node_name and f.node_name != self.node_name:
            return False
        if self.type and f.type != self.type:
            return False
        flt = self.flow
        client, server = (f.destination, f.source) if f.is_reply else (f.source, f.destination)
        direction = DIRECTION_NAME.get(f.traffic_direction)
        if flt.direction is not None and direction != flt.direction:
            return False
        if flt.port is not None and server.port != flt.port:
            return False
        kind = f.l7.WhichOneof("record") if f.HasField("l7") else None
        if flt.protocol == "http" and kind != "http":
            return False
        if flt.protocol in ("udp", "dns") and kind != "dns":
            return False
        if flt.protocol == "tcp" and kind == "dns":
            return False
        if flt.http_status is not None and (kind != "http" or not f.l7.http.code
                                            or not flt.http_status.matches(f.l7.http.code)):
            return False
        return flt.matches_ends(workload_of(client), client.ip or None, workload_of(server), server.ip or None)


def _opt(parse, param: str, value: str):
    return parse(param, value) if value else None


def _workload(param: str, value: str) -> Optional[str]:
    if value:
        F.parse_resource(param, value)   # a bad kind is an error now, not a silent non-match
    return value or None


def compile_filter(m: pb.FlowFilter) -> Compiled:
    """A FlowFilter message as the REST endpoint would parse the same parameters (ParamError if bad)."""
    flt = F.FlowFilter(
        either=F.Side(m.namespace or None, m.pod or None, _workload("workload", m.workload),
                      _opt(F.parse_cidr, "peer_ip", m.peer_ip)),
        source=F.Side(m.from_namespace or None, m.from_pod or None, _workload("from_workload", m.from_workload),
                      _opt(F.parse_cidr, "from_ip", m.from_ip)),
        destination=F.Side(m.to_namespace or None, m.to_pod or None, _workload("to_workload", m.to_workload),
                           _opt(F.parse_cidr, "to_ip", m.to_ip)),
        port=m.port or None,
        protocol=_opt(F.parse_protocol, "protocol", m.protocol),
        direction=_opt(F.parse_direction, "direction", m.direction),
        http_status=_opt(F.parse_status, "http_status", m.http_status),
    )
    if m.port > 65535:
        raise F.ParamError("port", f"want 1-65535, got {m.port}")
    return Compiled(flt, m.node_name, m.type)


@dataclass(frozen=True)
class Selector:
    """whitelist (any; all flows when empty) minus blacklist (any), plus since/until and the mask."""

    whitelist: Tuple[Compiled, ...]
    blacklist: Tuple[Compiled, ...]
    since_ns: Optional[int] = None
    until_ns: Optional[int] = None
    mask: Optional[field_mask_pb2.FieldMask] = None

    def wants(self, r: pb.GetFlowsResponse) -> bool:
        """Flows by the filters; node_status and lost_events always pass (a gap is never
        hidden), except those of other nodes when every whitelist filter names a node."""
        if r.WhichOneof("response_types") != "flow":
            names = {c.node_name for c in self.whitelist}
            return not self.whitelist or "" in names or r.node_name in names
        f = r.flow
        if self.whitelist and not any(c.matches(f) for c in self.whitelist):
            return False
        return not any(c.matches(f) for c in self.blacklist)

    def in_time(self, t_ns: int) -> bool:
        return (self.since_ns is None or t_ns >= self.since_ns) and (self.until_ns is None or t_ns <= self.until_ns)

    def shape(self, r: pb.GetFlowsResponse) -> pb.GetFlowsResponse:
        """The response with only the masked Flow fields (a copy; the shared message is untouched)."""
        if self.mask is None or r.WhichOneof("response_types") != "flow":
            return r
        out = pb.GetFlowsResponse(node_name=r.node_name)
        out.time.CopyFrom(r.time)
        self.mask.MergeMessage(r.flow, out.flow)
        return out


def selector(req: pb.GetFlowsRequest) -> Selector:
    """The request's filters compiled (ParamError on a bad value, naming the field)."""
    mask = None
    if req.HasField("field_mask") and req.field_mask.paths:
        if not req.field_mask.IsValidForDescriptor(pb.Flow.DESCRIPTOR):
            raise F.ParamError("field_mask", f"not Flow fields: {', '.join(req.field_mask.paths)}")
        mask = req.field_mask
    since = req.since.ToNanoseconds() if req.HasField("since") else None
    until = req.until.ToNanoseconds() if req.HasField("until") else None
    if since is not None and until is not None and since > until:
        raise F.ParamError("since", "must not be after until")
    return Selector(tuple(compile_filter(m) for m in req.whitelist), tuple(compile_filter(m) for m in req.blacklist),
                    since, until, mask)


def lost(node: str, source: int, n: int, t_ns: Optional[int] = None) -> pb.GetFlowsResponse:
    r = pb.GetFlowsResponse(lost_events=pb.LostEvent(source=source, num_events_lost=n), node_name=node)
    r.time.FromNanoseconds(time.time_ns() if t_ns is None else t_ns)
    return r


def node_status(node: str, state: int, names: Iterable[str], message: str = "",
                t_ns: Optional[int] = None) -> pb.GetFlowsResponse:
    r = pb.GetFlowsResponse(node_status=pb.NodeStatusEvent(state_change=state, node_names=list(names),
                                                           message=message), node_name=node)
    r.time.FromNanoseconds(time.time_ns() if t_ns is None else t_ns)
    return r


def count_flows(rs: Sequence[pb.GetFlowsResponse]) -> int:
    return sum(1 for r in rs if r.WhichOneof("response_types") == "flow")


def time_ns(r: pb.GetFlowsResponse) -> int:
    return r.time.ToNanoseconds()


def filter_from_params(params: dict) -> pb.FlowFilter:
    """The CLI's REST-style filter parameters (None = not given) as a FlowFilter message."""
    fields = {k: v for k, v in params.items() if v not in (None, "") and k in pb.FlowFilter.DESCRIPTOR.fields_by_name}
    if isinstance(fields.get("type"), str):
        fields["type"] = pb.FlowType.Value(str(fields["type"]).upper())
    return pb.FlowFilter(**fields)


def responses_sorted(rs: Sequence[pb.GetFlowsResponse]) -> List[pb.GetFlowsResponse]:
    return sorted(rs, key=time_ns)
