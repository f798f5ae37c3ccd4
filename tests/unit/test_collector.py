"""The Prometheus collector, on a private registry with synthetic snapshots: names, labels,
values, histogram buckets, agent health, and the real `promtool check metrics` on the output."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from meshlens.agent.aggregate.flows import FlowTable
from tests.unit.flow_helpers import closed, failed, key, opened
from meshlens.agent.identity.model import Workload
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.sources.base import AttachChoice, SourceHealth
from meshlens.exporter.prometheus.collector import make_registry
from meshlens.exporter.prometheus.metrics import METRICS


def snapshot_with(table: FlowTable, identity=None) -> AgentSnapshot:
    health = SourceHealth(events_read={"open": 3, "close": 2}, events_lost={"ringbuf_full": 0, "map_full": 4},
                          map_entries={"tcp_conns": 1}, map_capacity={"tcp_conns": 65536},
                          kernel_counters={"send_calls": 11}, callback_errors=0)
    return AgentSnapshot(
        areas={"tcp": table.snapshot()}, health={"tcp": health},
        attach={"tcp": [AttachChoice("tcp_bytes", "tracepoint", ["a", "b"], ["fentry: refused"])]},
        process=ProcessStats(1.25, 0.5, 50 << 20), cgroup_path={7: "/kubepods.slice/x.scope"}.get, sweeps=9,
        **({"identity": identity} if identity is not None else {}),
    )


def one_connection_table() -> FlowTable:
    t = FlowTable()
    k = key("outbound", "curl", 7, 99, "10.0.0.3", 80)
    opened(t, k, 0.0007)
    closed(t, k, sent=4099, received=613, rtt_us=90, duration_s=2.0)
    failed(t, k, "refused")
    return t


@pytest.fixture
def registry():
    t = one_connection_table()
    return make_registry(lambda: snapshot_with(t))


class K8sIdentity:
    """Names cgroup 7 as a Deployment's pod and 10.0.0.3 as a StatefulSet's pod."""

    def __init__(self, deleted: bool = False) -> None:
        self.deleted = deleted

    def local(self, cgroup_id, netns, process):
        return Workload("shop", "web-6f7-x2", "Deployment", "web")

    def peer(self, address):
        return Workload("shop", "db-0", "StatefulSet", "db")

    def expired(self, workload):
        return self.deleted and workload.pod == "db-0"


def test_kubernetes_names_label_both_ends() -> None:
    reg = make_registry(lambda: snapshot_with(one_connection_table(), K8sIdentity()))
    labels = {**LABELS, "k8s_namespace_name": "shop", "k8s_pod_name": "web-6f7-x2", "k8s_owner_kind": "Deployment",
              "k8s_owner_name": "web", "peer_k8s_namespace_name": "shop", "peer_k8s_pod_name": "db-0",
              "peer_k8s_owner_kind": "StatefulSet", "peer_k8s_owner_name": "db"}
    assert reg.get_sample_value("meshlens_tcp_sent_bytes_total", labels) == 4099


def test_series_of_expired_pods_are_no_longer_exported() -> None:
    reg = make_registry(lambda: snapshot_with(one_connection_table(), K8sIdentity(deleted=True)))
    text = generate_latest(reg).decode()
    assert "meshlens_tcp_sent_bytes_total{" not in text
    assert "meshlens_agent_cpu_seconds_total" in text  # the rest of the scrape is intact


LABELS = {"direction": "outbound", "process": "curl", "cgroup": "/kubepods.slice/x.scope", "netns": "99",
          "network_peer_address": "10.0.0.3", "server_port": "80",
          # standalone identity: the process names the local side, the address the peer
          "k8s_namespace_name": "", "k8s_pod_name": "", "k8s_owner_kind": "process", "k8s_owner_name": "curl",
          "peer_k8s_namespace_name": "", "peer_k8s_pod_name": "", "peer_k8s_owner_kind": "external",
          "peer_k8s_owner_name": "10.0.0.3"}


def test_tcp_counters_carry_values_and_identity(registry) -> None:
    assert registry.get_sample_value("meshlens_tcp_sent_bytes_total", LABELS) == 4099
    assert registry.get_sample_value("meshlens_tcp_received_bytes_total", LABELS) == 613
    assert registry.get_sample_value("meshlens_tcp_connections_opened_total", LABELS) == 1
    assert registry.get_sample_value("meshlens_tcp_connections_closed_total", LABELS) == 1
    assert registry.get_sample_value("meshlens_tcp_connect_failures_total", {**LABELS, "reason": "refused"}) == 1


def test_histograms_have_cumulative_buckets(registry) -> None:
    le = lambda v: {**LABELS, "le": v}  # noqa: E731
    assert registry.get_sample_value("meshlens_tcp_connect_duration_seconds_bucket", le("0.0005")) == 0
    assert registry.get_sample_value("meshlens_tcp_connect_duration_seconds_bucket", le("0.001")) == 1
    assert registry.get_sample_value("meshlens_tcp_connect_duration_seconds_bucket", le("+Inf")) == 1
    assert registry.get_sample_value("meshlens_tcp_connect_duration_seconds_sum", LABELS) == pytest.approx(0.0007)
    assert registry.get_sample_value("meshlens_tcp_rtt_seconds_bucket", le("0.0001")) == 1
    assert registry.get_sample_value("meshlens_tcp_connection_duration_seconds_count", LABELS) == 1


def test_agent_health_is_exported(registry) -> None:
    assert registry.get_sample_value("meshlens_agent_events_lost_total", {"source": "tcp", "reason": "map_full"}) == 4
    assert registry.get_sample_value("meshlens_agent_events_read_total", {"source": "tcp", "type": "open"}) == 3
    assert registry.get_sample_value("meshlens_agent_map_capacity_entries", {"source": "tcp", "map": "tcp_conns"}) == 65536
    assert registry.get_sample_value("meshlens_agent_attach_info",
                                     {"source": "tcp", "signal": "tcp_bytes", "variant": "tracepoint"}) == 1
    assert registry.get_sample_value("meshlens_agent_resident_memory_bytes") == 50 << 20
    assert registry.get_sample_value("meshlens_agent_cpu_seconds_total", {"mode": "user"}) == 1.25


def test_every_metric_follows_the_naming_convention() -> None:
    for name, d in METRICS.items():
        # meshlens_<area>_..., except HTTP metrics, which use OpenTelemetry's names
        assert name.startswith(("meshlens_", "http_server_", "http_client_")) and not name.endswith("_total"), name
        if d.kind == "histogram":
            assert name.endswith("_seconds") or name.endswith("_bytes"), name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_output(registry) -> None:
    text = generate_latest(registry)
    assert b"meshlens_tcp_sent_bytes_total" in text
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stderr.decode() + res.stdout.decode()


def test_series_per_rollup_is_what_a_full_rollup_exports() -> None:
    """The series budget divides by series_per_rollup(): one rollup with every histogram
    observed and every connect-failure reason exports exactly that many tcp series."""
    from meshlens.exporter.prometheus.tcp import series_per_rollup, tcp_families

    t = one_connection_table()
    for reason in ("refused", "timeout", "unreachable", "aborted", "other"):
        failed(t, key("outbound", "curl", 7, 99, "10.0.0.3", 80), reason)
    snap = snapshot_with(t)
    assert len(snap.areas["tcp"].rollups) == 1
    samples = [s for fam in tcp_families(snap) for s in fam.samples if not s.name.endswith("_created")]
    assert len(samples) == series_per_rollup()


def test_left_out_namespaces_are_not_exported() -> None:
    from meshlens.agent.identity.namespaces import NamespaceFilter

    def sent(view) -> float:
        reg = make_registry(lambda: snapshot_with(one_connection_table(), view))
        return sum(s.value for fam in reg.collect() for s in fam.samples if s.name == "meshlens_tcp_sent_bytes_total")

    assert sent(K8sIdentity()) == 4099
    assert sent(NamespaceFilter(K8sIdentity(), exclude=["shop"])) == 0
    assert sent(NamespaceFilter(K8sIdentity(), include=["payments"])) == 0
    assert sent(NamespaceFilter(K8sIdentity(), include=["shop"], exclude=["kube-system"])) == 4099
    f = NamespaceFilter(K8sIdentity(), include=["shop"])
    assert f.wanted("") and not f.wanted("other")  # workloads without a namespace always stay
