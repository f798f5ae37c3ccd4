"""`meshlens observe --server grpc://HOST:PORT` and `meshlens status`: the Observer API of an
agent (`run --grpc-listen`) or of the relay, with the REST flows endpoint's filters.

Place in the data flow: exporter/client/commands.py picks this module when the server is
given with a grpc:// (plain) or grpcs:// (TLS) scheme; the filters become one whitelist
FlowFilter (exporter/grpc/convert.filter_from_params), the responses are printed one line
each (like `hubble observe`) or as JSON lines (`-o json`, protobuf's JSON mapping).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterator, Optional, TextIO, Tuple

import grpc
from google.protobuf.json_format import MessageToDict

from meshlens.exporter.api.filters import ParamError, parse_time
from meshlens.exporter.grpc.convert import filter_from_params
from meshlens.exporter.grpc.tls import ClientTls, TlsError, channel
from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg

SCHEMES = ("grpc://", "grpcs://")
DEFAULT_GRPC_SERVER = "grpc://127.0.0.1:4245"   # the relay's default --listen


def is_grpc(server: Optional[str]) -> bool:
    return bool(server) and server.startswith(SCHEMES)  # type: ignore[union-attr]


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gRPC TLS (grpcs:// servers)")
    g.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate (default: system roots)")
    g.add_argument("--tls-cert", type=Path, help="PEM client certificate (servers that require mTLS)")
    g.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    g.add_argument("--tls-server-name", help="name the server's certificate carries, if not the host given")


def target(server: str, a: argparse.Namespace) -> Tuple[str, Optional[ClientTls]]:
    tls = server.startswith("grpcs://")
    addr = server.split("://", 1)[1].rstrip("/")
    if not addr:
        raise ParamError("server", f"no HOST:PORT in {server!r}")
    if not tls:
        return addr, None
    return addr, ClientTls(a.tls_ca, a.tls_cert, a.tls_key, a.tls_server_name)


def _ts(t) -> str:
    dt = datetime.fromtimestamp(t.ToNanoseconds() / 1e9, tz=timezone.utc)
    return dt.strftime("%b %d %H:%M:%S.%f")[:-3]


def _end(e: pb.Endpoint) -> str:
    who = f"{e.namespace}/{e.pod_name}" if e.pod_name else (e.workload_name or "?")
    addr = f"{e.ip}:{e.port}" if e.ip and e.port else (e.ip or (f":{e.port}" if e.port else ""))
    return f"{who} ({addr})" if addr else who


def line(r: pb.GetFlowsResponse) -> str:
    kind = r.WhichOneof("response_types")
    if kind == "flow":
        f = r.flow
        arrow = "<-" if f.is_reply else "->"
        src, dst = (f.destination, f.source) if f.is_reply else (f.source, f.destination)
        d = {pb.INGRESS: "ingress", pb.EGRESS: "egress"}.get(f.traffic_direction, "")
        return f"{_ts(r.time)}  {r.node_name}  {_end(src)} {arrow} {_end(dst)}  {d}  {f.summary}"
    if kind == "node_status":
        s = r.node_status
        msg = f" ({s.message})" if s.message else ""
        return (f"{_ts(r.time)}  {r.node_name}  node status: "
                f"{pb.NodeStatusEvent.StateChange.Name(s.state_change)} {','.join(s.node_names)}{msg}")
    if kind == "lost_events":
        le = r.lost_events
        return (f"{_ts(r.time)}  {r.node_name}  EVENTS LOST: {le.num_events_lost} "
                f"({pb.LostEvent.Source.Name(le.source)})")
    return f"{_ts(r.time)}  {r.node_name}  (empty response)"


def flows_request(a: argparse.Namespace, params: Dict[str, object]) -> pb.GetFlowsRequest:
    req = pb.GetFlowsRequest(number=max(0, a.last), follow=a.follow, first=getattr(a, "first", False))
    now = time.time()
    if a.since:
        req.since.FromNanoseconds(int(parse_time("since", a.since, now) * 1e9))
    if a.until:
        req.until.FromNanoseconds(int(parse_time("until", a.until, now) * 1e9))
    flt = filter_from_params(params)
    if flt.ListFields():
        req.whitelist.append(flt)
    return req


def observe(a: argparse.Namespace, params: Dict[str, object], out: TextIO) -> int:
    try:
        addr, tls = target(a.server, a)
        req = flows_request(a, params)
        ch = channel(addr, tls)
    except (ParamError, TlsError) as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 2
    try:
        stream: Iterator[pb.GetFlowsResponse] = pbg.ObserverStub(ch).GetFlows(req, wait_for_ready=False)
        for r in stream:
            if a.output == "json":
                out.write(json.dumps(MessageToDict(r, preserving_proto_field_name=True), sort_keys=True) + "\n")
            else:
                out.write(line(r) + "\n")
            out.flush()
        return 0
    except grpc.RpcError as exc:
        print(f"meshlens: {a.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        ch.close()


def status(a: argparse.Namespace, out: TextIO) -> int:
    server = a.server or DEFAULT_GRPC_SERVER
    if not is_grpc(server):
        server = "grpc://" + server
    try:
        addr, tls = target(server, a)
        ch = channel(addr, tls)
    except (ParamError, TlsError) as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 2
    try:
        stub = pbg.ObserverStub(ch)
        st = stub.ServerStatus(pb.ServerStatusRequest(), timeout=10)
        nodes = stub.GetNodes(pb.GetNodesRequest(), timeout=10).nodes
    except grpc.RpcError as exc:
        print(f"meshlens: {server}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    finally:
        ch.close()
    if a.output == "json":
        out.write(json.dumps({"status": MessageToDict(st, preserving_proto_field_name=True),
                              "nodes": [MessageToDict(n, preserving_proto_field_name=True) for n in nodes]},
                             indent=2, sort_keys=True) + "\n")
        return 0
    out.write(f"Version: {st.version}\nUptime: {st.uptime_seconds:.0f}s\n"
              f"Flows: {st.num_flows} held (ring of {st.max_flows}), {st.seen_flows} seen, {st.flows_rate:.2f} flows/s\n"
              f"Lost events: {st.lost_events}\n"
              f"Connected nodes: {st.num_connected_nodes}/{st.num_connected_nodes + st.num_unavailable_nodes}\n")
    if st.unavailable_nodes:
        out.write(f"Unavailable nodes: {', '.join(st.unavailable_nodes)}\n")
    for n in nodes:
        state = pb.Node.State.Name(n.state)
        msg = f"  {n.message}" if n.message else ""
        out.write(f"  {n.name:<16} {n.address:<22} {state:<17} tls={'yes' if n.tls else 'no'}  "
                  f"flows={n.seen_flows}{msg}\n")
    return 0
