"""Every metric the PrometheusRule and the Grafana dashboard query is one a live agent
exports (its /metrics, with the Kubernetes watch on against a list/watch server and real
pod traffic), and the DaemonSet's probe paths are served on the metrics port."""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Set

import pytest

from tests.integration.agent_proc import AgentProcess
from tests.integration.test_tcp_l4 import finish, run_json, start_listener
from tests.manifests import SCRAPE_SYNTHESIZED, dashboard_queries, documents, metric_names, recorded_names, rule_queries
from tests.unit.fake_apiserver import FakeApiServer, load_objects

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{{name: t, cluster: {{server: "{url}"}}}}]
contexts: [{{name: t, context: {{cluster: t, user: t}}}}]
current-context: t
users: [{{name: t, user: {{token: t}}}}]
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[AgentProcess]:
    with FakeApiServer(load_objects("pods") + load_objects("replicasets")) as api:
        kc = Path(tmp_path_factory.mktemp("kube")) / "kubeconfig"
        kc.write_text(KUBECONFIG.format(url=api.url))
        with AgentProcess("--kubernetes", "on", "--kubeconfig", str(kc)) as agent:
            yield agent


def exported(text: str) -> Set[str]:
    """Series names a scrape offers: sample names, and every declared family (a histogram
    family declares _bucket, _sum and _count) even while it has no sample yet."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def test_rules_and_dashboard_query_only_exported_metrics(node, live: AgentProcess) -> None:
    srv, cli = node.add_pod("qsrv"), node.add_pod("qcli")
    server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8080", "--count", "3", "--recv", "17", "--send", "19")
    run_json(cli, "client", "--host", srv.ipv4, "--port", "8080", "--count", "3", "--send", "17")
    finish(server)
    live.wait_total("meshlens_tcp_connections_closed_total", 3, netns=str(cli.netns_inode))
    have = exported(live.scrape_text()) | SCRAPE_SYNTHESIZED | recorded_names()
    assert "meshlens_k8s_watch_up" in have  # the watch families are there: Kubernetes is on
    for where, queries in (("PrometheusRule", rule_queries()), ("dashboard", dashboard_queries())):
        for q in queries:
            missing = metric_names(q) - have
            assert not missing, f"{where} query names metrics no agent exports: {sorted(missing)}\n{q}"


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_probe_paths_are_served(live: AgentProcess, probe: str) -> None:
    (ds,) = documents("daemonset.yaml")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    path = agent[probe]["httpGet"]["path"]
    try:
        with urllib.request.urlopen(f"http://{live.addr}{path}", timeout=5) as r:
            code = r.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    assert code == 200, f"{probe} path {path} answered {code}"
