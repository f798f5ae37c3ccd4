"""The agent's one HTTP app (FastAPI, ASGI): /metrics (Prometheus text, byte-identical to the
exporter's writer), /healthz, /readyz, the REST query API under /api/v1, SMI TrafficMetrics
under /apis/metrics.smi-spec.io/v1alpha1, and /openapi.json.

Place in the data flow: every answer is read from the agent's snapshot (AgentPort.snapshot)
and, for windows, its history ring (agent/aggregate/history.py) through
exporter/api/window.build_window; the views live in flows.py, viz.py, graph.py, smi.py and
tap.py. exporter/api/server.py runs this app with uvicorn.

Filters within one request are ANDed. Bad parameters answer 400 (our parsers) or 422 (type
checks), both with a body naming the parameter. With a bearer token configured, every path
but /healthz and /readyz needs `Authorization: Bearer <token>` (compared in constant time;
the token is never logged: uvicorn's access log is off and nothing here logs headers).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from meshlens.agent.aggregate.flows import FlowSnapshot
from meshlens.agent.aggregate.history import SnapshotHistory
from meshlens.agent.aggregate.snapshot import AgentSnapshot
from meshlens.exporter.api import filters as F
from meshlens.exporter.api import models as M
from meshlens.exporter.api.flows import flow_accs, page
from meshlens.exporter.api.graph import kiali_graph, to_dot, to_html
from meshlens.exporter.api.smi import SMI_KINDS, traffic_metrics, traffic_metrics_edges
from meshlens.exporter.api.tap import stream
from meshlens.exporter.api.viz import edge_rows, route_rows, stat_rows
from meshlens.exporter.api.window import Window, build_window
from meshlens.exporter.prometheus.text_format import CONTENT_TYPE, render

log = logging.getLogger("meshlens.api")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
SMI_PREFIX = "/apis/metrics.smi-spec.io/v1alpha1"


class Collects(Protocol):
    def collect(self) -> Iterable[object]: ...


class AgentPort(Protocol):
    """What the API needs from the agent (agent/runner.Agent)."""

    history: SnapshotHistory
    started_wall: float

    def snapshot(self) -> AgentSnapshot: ...
    def area(self, name: str) -> object: ...
    def tap_open(self, every: int = 1) -> bool: ...
    def tap_close(self) -> None: ...
    @property
    def tap_clients(self) -> int: ...


def _version() -> str:
    try:
        return version("meshlens")
    except PackageNotFoundError:
        return "0+unknown"


def _problem(status: int, error: str, detail: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"status": status, "error": error, "detail": detail}, status_code=status, headers=headers)


def _json(body: Any) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), media_type="application/json")


ERRORS: Dict[int | str, Dict[str, Any]] = {400: {"model": M.Problem, "description": "a bad parameter"},
                                           401: {"model": M.Problem, "description": "missing or wrong bearer token"},
                                           422: {"model": M.Problem, "description": "a parameter of the wrong type"}}


def create_app(agent: AgentPort, collector: Collects, token: Optional[str] = None,
               wall: Callable[[], float] = time.time) -> FastAPI:
    app = FastAPI(title="meshlens", version=_version(),
                  description="Per-pod flows, golden signals, service map and a live tap, read from the "
                              "meshlens agent's snapshot. Filters within one request are ANDed.")
    expected = f"Bearer {token}".encode() if token else None

    if expected is not None:
        app.add_middleware(BearerAuth, expected=expected)

    @app.exception_handler(F.ParamError)
    async def param_error(_request: Request, exc: F.ParamError) -> JSONResponse:
        return _problem(400, "bad parameter", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _problem(422, "bad parameter", "; ".join(parts))

    # ---- helpers -------------------------------------------------------------------------
    def window_for(since: Optional[str], until: Optional[str]) -> Window:
        now = wall()
        s = F.parse_time("since", since, now) if since else None
        u = F.parse_time("until", until, now) if until else None
        if s is not None and u is not None and s > u:
            raise F.ParamError("since", "must not be after until")
        snap = agent.snapshot()
        return build_window(agent.history, snap.areas, snap.identity, now, s, u)

    def window_of(duration: str, param: str = "window") -> Window:
        seconds = F.parse_duration(param, duration)
        snap = agent.snapshot()
        now = wall()
        return build_window(agent.history, snap.areas, snap.identity, now, now - seconds, None)

    def opt(parse: Callable[[str, str], Any], param: str, value: Optional[str]) -> Any:
        return parse(param, value) if value not in (None, "") else None

    def flow_filter(namespace, pod, workload, ip, from_namespace, from_pod, from_workload, from_ip,
                    to_namespace, to_pod, to_workload, to_ip, port, protocol, direction, http_status) -> F.FlowFilter:
        return F.FlowFilter(
            either=F.Side(namespace, pod, _checked_workload("workload", workload), opt(F.parse_cidr, "peer_ip", ip)),
            source=F.Side(from_namespace, from_pod, _checked_workload("from_workload", from_workload),
                          opt(F.parse_cidr, "from_ip", from_ip)),
            destination=F.Side(to_namespace, to_pod, _checked_workload("to_workload", to_workload),
                               opt(F.parse_cidr, "to_ip", to_ip)),
            port=port, protocol=opt(F.parse_protocol, "protocol", protocol),
            direction=opt(F.parse_direction, "direction", direction),
            http_status=opt(F.parse_status, "http_status", http_status),
        )

    # ---- plain endpoints -------------------------------------------------------------------
    @app.get("/metrics", include_in_schema=True, response_class=Response, tags=["prometheus"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}, 401: ERRORS[401]})
    def metrics() -> Response:
        try:
            body = render(collector.collect())
        except Exception:  # noqa: BLE001 - a failed scrape is a 500, never a dead agent
            log.exception("rendering /metrics failed")
            return Response(b"internal error rendering metrics\n", status_code=500, media_type="text/plain")
        return Response(body, headers={"Content-Type": CONTENT_TYPE})

    @app.get("/healthz", response_model=M.Health, tags=["health"])
    def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=M.Health, tags=["health"],
             responses={503: {"model": M.Health, "description": "not ready yet"}})
    def readyz() -> Response:
        if _ready(agent.snapshot()):
            return _json({"status": "ready"})
        return JSONResponse({"status": "starting"}, status_code=503)

    # ---- flows -----------------------------------------------------------------------------
    def flows_answer(flt: F.FlowFilter, since, until, limit, cursor) -> Response:
        w = window_for(since, until)
        chunk, nxt = page(flow_accs(w, flt), limit, cursor)
        return _json({"window": w.describe(), "flows": chunk, "next_cursor": nxt})

    flow_doc = {"response_model": M.FlowList, "tags": ["flows"], "responses": ERRORS}

    @app.get("/api/v1/flows", **flow_doc)
    def flows(
        namespace: Optional[str] = Query(None, description="either end in this namespace"),
        pod: Optional[str] = Query(None, description="either end's pod name starts with this ([namespace/]prefix)"),
        workload: Optional[str] = Query(None, description="either end's workload ([kind/]name)"),
        peer_ip: Optional[str] = Query(None, description="the remote address is in this CIDR"),
        from_namespace: Optional[str] = None, from_pod: Optional[str] = None, from_workload: Optional[str] = None,
        from_ip: Optional[str] = Query(None, description="client address in this CIDR (known for inbound flows)"),
        to_namespace: Optional[str] = None, to_pod: Optional[str] = None, to_workload: Optional[str] = None,
        to_ip: Optional[str] = Query(None, description="server address in this CIDR (known for outbound flows)"),
        port: Optional[int] = Query(None, ge=1, le=65535, description="server port"),
        protocol: Optional[str] = Query(None, description="tcp | udp | http (TCP flows where L7 saw HTTP) | dns"),
        direction: Optional[str] = Query(None, description="inbound | outbound (or ingress | egress)"),
        http_status: Optional[str] = Query(None, description="404, or a prefix such as 5+"),
        since: Optional[str] = Query(None, description="RFC 3339 or relative (5m); default: since the agent started"),
        until: Optional[str] = Query(None, description="RFC 3339 or relative; default: now"),
        limit: int = Query(100, ge=1, le=10000),
        cursor: Optional[str] = Query(None, description="next_cursor of the previous page"),
    ) -> Response:
        flt = flow_filter(namespace, pod, workload, peer_ip, from_namespace, from_pod, from_workload, from_ip,
                          to_namespace, to_pod, to_workload, to_ip, port, protocol, direction, http_status)
        return flows_answer(flt, since, until, limit, cursor)

    @app.get("/api/v1/namespaces/{namespace}/pods/{pod}/flows", **flow_doc)
    def pod_flows(
        namespace: str = Path(..., min_length=1), pod: str = Path(..., min_length=1),
        peer_ip: Optional[str] = None, port: Optional[int] = Query(None, ge=1, le=65535),
        protocol: Optional[str] = None, direction: Optional[str] = None, http_status: Optional[str] = None,
        since: Optional[str] = None, until: Optional[str] = None,
        limit: int = Query(100, ge=1, le=10000), cursor: Optional[str] = None,
    ) -> Response:
        """Flows whose local end is this pod (exact name)."""
        flt = flow_filter(None, None, None, peer_ip, None, None, None, None, None, None, None, None,
                          port, protocol, direction, http_status)
        w = window_for(since, until)
        chunk, nxt = page(flow_accs(w, flt, (namespace, pod)), limit, cursor)
        return _json({"window": w.describe(), "flows": chunk, "next_cursor": nxt})

    # ---- Linkerd viz shapes ------------------------------------------------------------------
    viz_doc = {"tags": ["viz"], "responses": ERRORS}

    @app.get("/api/v1/stat", response_model=M.StatList, **viz_doc)
    def stat(
        namespace: Optional[str] = None,
        kind: Optional[str] = Query(None, description="only workloads of this kind (deploy, sts, ds, pod, process, ...)"),
        resource: Optional[str] = Query(None, description="one workload: [kind/]name"),
        from_: Optional[str] = Query(None, alias="from", description="only requests sent by this workload ([kind/]name)"),
        to: Optional[str] = Query(None, description="rows for the callers of this workload, their requests to it"),
        window: str = Query("1m", description="duration, e.g. 30s, 1m (Linkerd's -t)"),
    ) -> Response:
        if from_ and to:
            raise F.ParamError("from", "give either from or to, not both")
        k = None
        if kind:
            k = F.KINDS.get(kind.lower())
            if k is None:
                raise F.ParamError("kind", f"unknown kind {kind!r}")
        w = window_of(window)
        rows = stat_rows(w, namespace, k, opt(F.parse_resource, "resource", resource),
                         opt(F.parse_resource, "from", from_), opt(F.parse_resource, "to", to))
        return _json({"window": w.describe(), "rows": rows})

    @app.get("/api/v1/routes", response_model=M.RouteList, **viz_doc)
    def routes(
        resource: Optional[str] = Query(None, description="the workload whose routes to show: [kind/]name"),
        namespace: Optional[str] = None,
        to: Optional[str] = Query(None, description="the routes the resource calls on this workload"),
        window: str = Query("1m"),
    ) -> Response:
        w = window_of(window)
        rows = route_rows(w, opt(F.parse_resource, "resource", resource), namespace, opt(F.parse_resource, "to", to))
        return _json({"window": w.describe(), "rows": rows})

    @app.get("/api/v1/edges", response_model=M.EdgeList, **viz_doc)
    def edges(namespace: Optional[str] = None,
              resource: Optional[str] = Query(None, description="edges touching this workload: [kind/]name"),
              window: str = Query("1m")) -> Response:
        w = window_of(window)
        return _json({"window": w.describe(), "rows": edge_rows(w, namespace, opt(F.parse_resource, "resource", resource))})

    @app.get("/api/v1/servicemap", response_model=M.Graph, tags=["viz"],
             responses={**ERRORS, 200: {"content": {"application/json": {}, "text/vnd.graphviz": {}, "text/html": {}},
                                        "description": "Kiali graph JSON, Graphviz DOT or an HTML page"}})
    def servicemap(namespace: Optional[str] = None,
                   format: str = Query("json", pattern="^(json|dot|html)$"),  # noqa: A002 - the parameter's name
                   window: str = Query("1m")) -> Response:
        g = kiali_graph(window_of(window), namespace)
        if format == "dot":
            return Response(to_dot(g), media_type="text/vnd.graphviz")
        if format == "html":
            return Response(to_html(g), media_type="text/html")
        return _json(g)

    # ---- SMI -------------------------------------------------------------------------------
    smi_doc = {"tags": ["smi"], "responses": {**ERRORS, 404: {"model": M.Problem, "description": "unknown kind"}}}

    def smi_kind(kind: str) -> None:
        if kind not in SMI_KINDS:
            raise _NotFound(f"unknown kind {kind!r}: one of {', '.join(sorted(SMI_KINDS))}")

    @app.get(SMI_PREFIX + "/namespaces/{namespace}/{kind}/{name}", response_model=M.TrafficMetrics, **smi_doc)
    def smi(namespace: str, kind: str, name: str, t: str = Query("30s", description="window")) -> Response:
        smi_kind(kind)
        return _json(traffic_metrics(window_of(t, "t"), namespace, kind, name))

    @app.get(SMI_PREFIX + "/namespaces/{namespace}/{kind}/{name}/edges", response_model=M.TrafficMetricsList, **smi_doc)
    def smi_edges(namespace: str, kind: str, name: str, t: str = Query("30s", description="window")) -> Response:
        smi_kind(kind)
        return _json(traffic_metrics_edges(window_of(t, "t"), namespace, kind, name))

    @app.exception_handler(_NotFound)
    async def not_found(_request: Request, exc: _NotFound) -> JSONResponse:
        return _problem(404, "not found", str(exc))

    # ---- tap -------------------------------------------------------------------------------
    @app.get("/api/v1/tap", tags=["tap"], response_class=EventSourceResponse,
             responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                        "description": "events request_init, response_init, response_end (JSON data)"}})
    async def tap(
        request: Request,
        namespace: Optional[str] = None, pod: Optional[str] = None, workload: Optional[str] = None,
        peer_ip: Optional[str] = None,
        from_namespace: Optional[str] = None, from_pod: Optional[str] = None, from_workload: Optional[str] = None,
        from_ip: Optional[str] = None,
        to_namespace: Optional[str] = None, to_pod: Optional[str] = None, to_workload: Optional[str] = None,
        to_ip: Optional[str] = None,
        port: Optional[int] = Query(None, ge=1, le=65535),
        direction: Optional[str] = None, http_status: Optional[str] = None,
        max_rps: float = Query(100.0, gt=0, le=10000, description="cap on requests shown per second, split across pods"),
        duration: Optional[str] = Query(None, description="end the stream after this long (default: until the client leaves)"),
    ) -> Response:
        flt = flow_filter(namespace, pod, workload, peer_ip, from_namespace, from_pod, from_workload, from_ip,
                          to_namespace, to_pod, to_workload, to_ip, port, None, direction, http_status)
        until = time.monotonic() + F.parse_duration("duration", duration) if duration else None
        since_ns = time.monotonic_ns()
        if not agent.tap_open():
            agent.tap_close()
            raise F.ParamError("tap", "L7 capture is not running on this agent (--features without l7)")
        identity = getattr(agent, "identity", None) or agent.snapshot().identity

        def records() -> tuple:
            return getattr(agent.area("http"), "tap", ())

        async def events():
            try:
                async for kind, data in stream(records, identity, flt, max_rps, since_ns, until):
                    if await request.is_disconnected():
                        break
                    yield {"event": kind, "data": json.dumps(data, separators=(",", ":"))}
            finally:
                agent.tap_close()

        return EventSourceResponse(events(), ping=10)

    # ---- status ------------------------------------------------------------------------------
    @app.get("/api/v1/status", response_model=M.Status, tags=["status"], responses={401: ERRORS[401]})
    def status() -> Response:
        return _json(_status(agent, agent.snapshot(), wall()))

    return app


class _NotFound(Exception):
    pass


class BearerAuth:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would copy every body through a
    memory stream: /metrics at 10k rollups is 170 MB): the bearer token on every path but
    /healthz and /readyz, compared in constant time."""

    def __init__(self, app: Any, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    got = value
                    break
            if not hmac.compare_digest(got, self.expected):
                resp = _problem(401, "unauthorized", "this agent needs Authorization: Bearer <token>",
                                {"WWW-Authenticate": 'Bearer realm="meshlens"'})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _ready(snap: AgentSnapshot) -> bool:
    attached = all(ch.chosen for choices in snap.attach.values() for ch in choices if ch.required)
    return bool(snap.attach) and attached and snap.sweeps >= 1


def _status(agent: AgentPort, snap: AgentSnapshot, now: float) -> Dict[str, Any]:
    features = getattr(agent, "features", None)
    kernel: Dict[str, object] = {}
    if features is not None:
        kernel = {"release": features.release, "btf": features.btf, "tracefs": str(features.tracefs or ""),
                  "bpffs": features.bpffs, "root": features.is_root, "memlock_bytes": features.memlock_bytes}
    attach: List[Dict[str, object]] = []
    for src, choices in sorted(snap.attach.items()):
        for ch in choices:
            attach.append({"source": src, "signal": ch.signal, "chosen": ch.chosen, "programs": list(ch.programs),
                           "tried": list(ch.tried), "required": ch.required})
    sources = {}
    for name, h in sorted(snap.health.items()):
        fill = {m: round(h.map_entries.get(m, 0) / cap, 4) for m, cap in h.map_capacity.items() if cap}
        sources[name] = {"events_read": dict(h.events_read), "events_lost": dict(h.events_lost),
                         "map_entries": dict(h.map_entries), "map_capacity": dict(h.map_capacity),
                         "map_fill": fill, "callback_errors": h.callback_errors}
    flows: Dict[str, int] = {}
    tcp = snap.areas.get("tcp")
    if isinstance(tcp, FlowSnapshot):
        flows = {"rollups": len(tcp.rollups), "max_rollups": tcp.max_rollups, "live_connections": tcp.live_connections,
                 "overflows": tcp.rollup_overflows, "expired": tcp.rollups_expired}
    watches = {r: {"up": s.up, "synced": s.synced, "objects": s.objects, "errors": s.errors_total,  # type: ignore[attr-defined]
                   "last_sync_unix": s.last_sync_unix} for r, s in sorted(snap.watch.items())}  # type: ignore[attr-defined]
    h = agent.history
    return {
        "version": _version(), "uptime_seconds": round(now - agent.started_wall, 3), "ready": _ready(snap),
        "sweeps": snap.sweeps, "kernel": kernel, "attach": attach, "sources": sources, "flows": flows,
        "identity": {"mode": "kubernetes" if snap.watch else "standalone", "watches": watches},
        "history": {"interval_seconds": h.interval_s, "length": float(h.length), "records": float(len(h)),
                    "oldest_unix": round(h.oldest_wall(), 3)},
        "tap_clients": agent.tap_clients,
        "process": {"cpu_user_seconds": snap.process.cpu_user_s, "cpu_system_seconds": snap.process.cpu_system_s,
                    "rss_bytes": float(snap.process.rss_bytes)},
    }


def _checked_workload(param: str, value: Optional[str]) -> Optional[str]:
    if value:
        F.parse_resource(param, value)   # raises a ParamError now, not deep inside matching
    return value or None
