"""The client subcommands of `meshlens`: observe, stat, routes, edges, top, tap, servicemap,
status. Each queries a running agent (--server, default the local agent at 127.0.0.1:9433)
and prints a table (exporter/client/render.py) or, with `-o json`, the API's JSON.
`observe --server grpc://HOST:PORT` (or grpcs://) and `status` use the gRPC Observer of
an agent or the relay instead (exporter/client/grpc_client.py).

Place in the data flow: exporter/cli.py registers these; they call exporter/client/http.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from meshlens.exporter.client import render
from meshlens.exporter.client.grpc_client import DEFAULT_GRPC_SERVER, add_tls_arguments, is_grpc
from meshlens.exporter.client.grpc_client import observe as grpc_observe
from meshlens.exporter.client.grpc_client import status as grpc_status
from meshlens.exporter.client.http import DEFAULT_SERVER, AgentClient, ClientError, read_token


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--server", default=None, help=f"agent address (default $MESHLENS_SERVER or {DEFAULT_SERVER})")
    p.add_argument("--token-file", default=None, help="file with the agent's bearer token (or $MESHLENS_AUTH_TOKEN)")
    if output:
        p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _flow_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (ANDed, named like hubble observe)")
    for name, help_ in (("namespace", "either end in this namespace"), ("pod", "either end's pod name prefix ([ns/]prefix)"),
                        ("workload", "either end's workload ([kind/]name)"), ("ip", "remote address in this CIDR")):
        g.add_argument(f"--{name}", help=help_)
    for side in ("from", "to"):
        for name in ("namespace", "pod", "workload", "ip"):
            g.add_argument(f"--{side}-{name}", dest=f"{side}_{name}")
    g.add_argument("--port", type=int)
    g.add_argument("--direction", "--traffic-direction", dest="direction", help="inbound|outbound (ingress|egress)")
    g.add_argument("--http-status", help="404, or a prefix such as 5+")


def _filter_params(a: argparse.Namespace) -> Dict[str, Any]:
    out = {"namespace": a.namespace, "pod": a.pod, "workload": a.workload, "peer_ip": a.ip, "port": a.port,
           "direction": a.direction, "http_status": a.http_status}
    for side in ("from", "to"):
        for name in ("namespace", "pod", "workload", "ip"):
            out[f"{side}_{name}"] = getattr(a, f"{side}_{name}")
    return out


def add_client_commands(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("observe", help="per-pod flows from the running agent (like hubble observe); with "
                                        "--server grpc://HOST:PORT the flow stream of an agent or the relay")
    _common(p)
    _flow_filters(p)
    p.add_argument("--protocol", choices=["tcp", "udp", "http", "dns"])
    p.add_argument("--since", help="RFC 3339 or relative (5m); default: since the agent started")
    p.add_argument("--until")
    p.add_argument("--last", type=int, default=1000, help="at most this many flows (pages followed)")
    g = p.add_argument_group("gRPC only (--server grpc://HOST:PORT or grpcs://)")
    g.add_argument("-f", "--follow", action="store_true", help="keep streaming new flows")
    g.add_argument("--first", action="store_true", help="the oldest --last flows instead of the newest")
    g.add_argument("--node-name", help="flows observed by this node")
    g.add_argument("--type", choices=["l4", "l7"], help="connection events (l4) or HTTP exchanges (l7)")
    add_tls_arguments(p)
    p.set_defaults(func=cmd_observe)

    p = sub.add_parser("status", help="flow stream status of an agent or the relay (gRPC ServerStatus, GetNodes)")
    p.add_argument("--server", default=None, help=f"HOST:PORT, grpc:// or grpcs:// (default {DEFAULT_GRPC_SERVER}, "
                                                  "the relay)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_tls_arguments(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stat", help="golden signals per workload (like linkerd viz stat)")
    _common(p)
    p.add_argument("resource", nargs="?", help="kind (deploy, sts, ds, pod, process) or kind/name")
    p.add_argument("-n", "--namespace")
    p.add_argument("--from", dest="from_", metavar="RESOURCE", help="only requests sent by this workload")
    p.add_argument("--to", metavar="RESOURCE", help="the callers of this workload, their requests to it")
    p.add_argument("-t", "--time-window", default="1m")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("routes", help="per-route golden signals of a workload (like linkerd viz routes)")
    _common(p)
    p.add_argument("resource", nargs="?", help="[kind/]name")
    p.add_argument("-n", "--namespace")
    p.add_argument("--to", metavar="RESOURCE", help="routes the resource calls on this workload")
    p.add_argument("-t", "--time-window", default="1m")
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser("edges", help="who calls whom (like linkerd viz edges)")
    _common(p)
    p.add_argument("resource", nargs="?", help="only edges touching this workload: [kind/]name")
    p.add_argument("-n", "--namespace")
    p.add_argument("-t", "--time-window", default="1m")
    p.set_defaults(func=cmd_edges)

    for name, helptext, fn in (("tap", "live sampled requests (like linkerd viz tap)", cmd_tap),
                               ("top", "the most requested routes from a tap (like linkerd viz top)", cmd_top)):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        _flow_filters(p)
        p.add_argument("--max-rps", type=float, default=100.0, help="cap on requests shown per second")
        p.add_argument("--duration", default=None if name == "tap" else "5s",
                       help="stop after this long (tap default: until interrupted)")
        p.set_defaults(func=fn)

    p = sub.add_parser("servicemap", help="the service map as Kiali JSON, Graphviz DOT or HTML")
    _common(p, output=False)
    p.add_argument("-o", "--output", choices=["json", "dot", "html"], default="dot")
    p.add_argument("-n", "--namespace")
    p.add_argument("-t", "--time-window", default="1m")
    p.set_defaults(func=cmd_servicemap)


def _run(a: argparse.Namespace, body: Callable[[AgentClient, TextIO], None], out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    try:
        client = AgentClient(a.server, read_token(a.token_file))
    except ClientError as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 1
    try:
        body(client, out)
        return 0
    except ClientError as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def _dump(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cmd_observe(a: argparse.Namespace) -> int:
    if is_grpc(a.server):
        params = dict(_filter_params(a), protocol=a.protocol, node_name=a.node_name,
                      type={"l4": "L4", "l7": "L7", None: None}[a.type])
        return grpc_observe(a, params, sys.stdout)
    for flag in ("follow", "first", "node_name", "type"):
        if getattr(a, flag):
            print(f"meshlens: --{flag.replace('_', '-')} needs the flow stream: --server grpc://HOST:PORT",
                  file=sys.stderr)
            return 2

    def body(c: AgentClient, out: TextIO) -> None:
        window, flows = c.flows_all(a.last, since=a.since, until=a.until, protocol=a.protocol, **_filter_params(a))
        if a.output == "json":
            _dump({"window": window, "flows": flows}, out)
        else:
            out.write(render.flows_table(flows))
    return _run(a, body)


def cmd_status(a: argparse.Namespace) -> int:
    return grpc_status(a, sys.stdout)


def _resource_params(resource: Optional[str]) -> Dict[str, Optional[str]]:
    """`stat deploy` (a kind) or `stat deploy/web` (one workload)."""
    if not resource:
        return {}
    if "/" in resource:
        return {"resource": resource}
    return {"kind": resource}


def cmd_stat(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        ans = c.get_json("/api/v1/stat", namespace=a.namespace, window=a.time_window, to=a.to,
                         **{"from": a.from_}, **_resource_params(a.resource))
        if a.output == "json":
            _dump(ans, out)
        else:
            out.write(render.stat_table(ans["rows"], show_namespace=a.namespace is None))
    return _run(a, body)


def cmd_routes(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        ans = c.get_json("/api/v1/routes", resource=a.resource, namespace=a.namespace, to=a.to, window=a.time_window)
        if a.output == "json":
            _dump(ans, out)
        else:
            out.write(render.routes_table(ans["rows"]))
    return _run(a, body)


def cmd_edges(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        ans = c.get_json("/api/v1/edges", resource=a.resource, namespace=a.namespace, window=a.time_window)
        if a.output == "json":
            _dump(ans, out)
        else:
            out.write(render.edges_table(ans["rows"]))
    return _run(a, body)


def cmd_tap(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        ctx: Dict[int, Dict[str, Any]] = {}
        for event, data in c.tap(max_rps=a.max_rps, duration=a.duration, **_filter_params(a)):
            if a.output == "json":
                out.write(json.dumps({"event": event, **data}, sort_keys=True) + "\n")
            else:
                out.write(render.tap_line(event, data, ctx) + "\n")
            out.flush()
    return _run(a, body)


def top_rows(events: List[tuple]) -> List[Dict[str, Any]]:
    """Aggregate tap events per (source, destination, method, route), most requested first."""
    reqs: Dict[int, Dict[str, Any]] = {}
    agg: Dict[tuple, Dict[str, Any]] = {}
    for event, d in events:
        if event == "request_init":
            reqs[d["id"]] = d
        elif event == "response_init" and d["id"] in reqs:
            r = reqs.pop(d["id"])
            k = (render.who(r["source"]), render.who(r["destination"]), r["method"], r["route"])
            row = agg.setdefault(k, {"source": k[0], "destination": k[1], "method": k[2], "route": k[3], "count": 0,
                                     "best_ms": None, "worst_ms": None, "successes": 0, "failures": 0})
            row["count"] += 1
            lat = d["latency_ms"]
            row["best_ms"] = lat if row["best_ms"] is None else min(row["best_ms"], lat)
            row["worst_ms"] = lat if row["worst_ms"] is None else max(row["worst_ms"], lat)
            row["failures" if d["status"] >= 500 else "successes"] += 1
    return sorted(agg.values(), key=lambda r: (-r["count"], r["source"], r["destination"], r["route"]))


def cmd_top(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        started = time.monotonic()
        events = list(c.tap(max_rps=a.max_rps, duration=a.duration, **_filter_params(a)))
        rows = top_rows(events)
        if a.output == "json":
            _dump({"seconds": round(time.monotonic() - started, 3), "rows": rows}, out)
        else:
            out.write(render.top_table(rows))
    return _run(a, body)


def cmd_servicemap(a: argparse.Namespace) -> int:
    def body(c: AgentClient, out: TextIO) -> None:
        params = {"namespace": a.namespace, "window": a.time_window, "format": a.output}
        if a.output == "json":
            _dump(c.get_json("/api/v1/servicemap", **params), out)
        else:
            out.write(c.get_text("/api/v1/servicemap", **params))
    return _run(a, body)
