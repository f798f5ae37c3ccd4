"""Pydantic response models of the REST API: they define /openapi.json. The views build plain
dicts of the same shape (fast at 10k rollups); schemathesis checks that answers match.

Place in the data flow: exporter/api/{flows,viz,graph,smi,tap}.py produce, app.py declares
these as each route's response model.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowInfo(_M):
    start: str = Field(description="RFC 3339 start of the window actually covered")
    end: str
    seconds: float
    truncated: bool = Field(description="the agent's history no longer reaches the asked start")


class Endpoint(_M):
    namespace: str
    pod: str
    workload_kind: str = Field(description="Deployment, StatefulSet, ..., Pod; process (standalone); external")
    workload: str
    ip: Optional[str] = None


class Quantiles(_M):
    p50: Optional[float]
    p95: Optional[float]
    p99: Optional[float]


class HttpSummary(_M):
    requests: int
    errors: int = Field(description="responses with a 5xx status")
    by_status: Dict[str, int]
    latency_ms: Quantiles


class DnsSummary(_M):
    lookups: int = Field(description="lookups answered")
    answers: int = Field(description="answer records")
    by_rcode: Dict[str, int]
    latency_ms: Quantiles


class Flow(_M):
    local: Endpoint
    peer: Endpoint
    direction: str = Field(description="inbound | outbound, as the local pod sees the connection")
    protocol: str = Field(description="tcp, or udp for DNS lookups (UDP bytes are not tracked: 0)")
    l7: Optional[str] = Field(description="http or dns when L7 saw that protocol on this flow")
    port: int = Field(description="server port: the local port for inbound, the remote port for outbound")
    bytes_sent: int
    bytes_received: int
    connections_opened: int
    connections_closed: int
    connections_active: int
    connect_failures: Dict[str, int]
    retransmits: int = Field(description="retransmitted segments")
    resets_sent: int
    resets_received: int
    rtt_ms: Quantiles
    connect_latency_ms: Quantiles
    http: Optional[HttpSummary]
    dns: Optional[DnsSummary]


class FlowList(_M):
    window: WindowInfo
    flows: List[Flow]
    next_cursor: Optional[str] = Field(description="pass as `cursor` for the next page; null on the last page")


class _Golden(_M):
    success: Optional[float] = Field(description="share of requests without a 5xx status; null without requests")
    rps: float
    latency_ms_p50: Optional[float]
    latency_ms_p95: Optional[float]
    latency_ms_p99: Optional[float]
    requests: int
    success_count: int
    failure_count: int


class StatRow(_Golden):
    namespace: str
    kind: str
    name: str
    tcp_open_connections: int
    tcp_read_bytes_rate: float
    tcp_write_bytes_rate: float


class StatList(_M):
    window: WindowInfo
    rows: List[StatRow]


class RouteRow(_Golden):
    route: str
    authority: str


class RouteList(_M):
    window: WindowInfo
    rows: List[RouteRow]


class EdgeRow(_M):
    src: str
    src_namespace: str
    src_kind: str
    dst: str
    dst_namespace: str
    dst_kind: str
    requests: int
    failures: int
    rps: float
    success: Optional[float]
    latency_ms_p50: Optional[float]
    latency_ms_p95: Optional[float]
    latency_ms_p99: Optional[float]
    bytes_sent: int
    bytes_received: int
    tcp_write_bytes_rate: float
    tcp_read_bytes_rate: float
    connections_opened: int
    tcp_open_connections: int


class EdgeList(_M):
    window: WindowInfo
    rows: List[EdgeRow]


class GraphNodeData(_M):
    id: str
    nodeType: str
    namespace: str
    workload: str
    workloadKind: str
    label: str


class GraphNode(_M):
    data: GraphNodeData


class Traffic(_M):
    protocol: str
    rates: Dict[str, str]


class GraphEdgeData(_M):
    id: str
    source: str
    target: str
    traffic: Traffic
    responseTime: str = Field(description="p95 latency in ms (Kiali's responseTime); empty without HTTP")
    throughput: str = Field(description="bytes per second, both directions")
    requests: int
    errors: int
    connections: int


class GraphEdge(_M):
    data: GraphEdgeData


class GraphElements(_M):
    nodes: List[GraphNode]
    edges: List[GraphEdge]


class Graph(_M):
    timestamp: int
    duration: int
    graphType: str
    window: WindowInfo
    elements: GraphElements


class SmiMetric(_M):
    name: str
    unit: Optional[str] = None
    value: str


class SmiObjectRef(_M):
    kind: str
    namespace: str
    name: str


class SmiEdge(_M):
    direction: str
    resource: SmiObjectRef


class SmiMetadata(_M):
    name: Optional[str] = None
    namespace: Optional[str] = None
    selfLink: str
    creationTimestamp: Optional[str] = None


class TrafficMetrics(_M):
    kind: str
    apiVersion: str
    metadata: SmiMetadata
    timestamp: str
    window: str
    resource: SmiObjectRef
    edge: Optional[SmiEdge]
    metrics: List[SmiMetric]


class TrafficMetricsList(_M):
    kind: str
    apiVersion: str
    metadata: SmiMetadata
    resource: SmiObjectRef
    items: List[TrafficMetrics]


class AttachPoint(_M):
    source: str
    signal: str
    chosen: Optional[str]
    programs: List[str]
    tried: List[str]
    required: bool


class SourceStatus(_M):
    events_read: Dict[str, int]
    events_lost: Dict[str, int]
    map_entries: Dict[str, int]
    map_capacity: Dict[str, int]
    map_fill: Dict[str, float]
    callback_errors: int


class IdentityStatus(_M):
    mode: str = Field(description="kubernetes | standalone")
    watches: Dict[str, Dict[str, object]]


class Status(_M):
    version: str
    uptime_seconds: float
    ready: bool
    sweeps: int
    kernel: Dict[str, object]
    attach: List[AttachPoint]
    sources: Dict[str, SourceStatus]
    flows: Dict[str, int]
    identity: IdentityStatus
    history: Dict[str, float]
    tap_clients: int
    process: Dict[str, float]


class Health(_M):
    status: str


class Problem(_M):
    """Every 4xx/5xx body."""

    status: int
    error: str
    detail: str
