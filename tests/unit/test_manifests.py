"""daemonset/ as a cluster would read it: every manifest validates against the Kubernetes
1.30 schemas (kubernetes-validate) or the Prometheus Operator CRD models (cloudcoil), the
pod has exactly the least privilege it claims, its command parses with the real CLI, the
RBAC grants exactly what the identity watch lists, and `promtool check rules` accepts the
alert rules. (That the queries name exported metrics is checked against a live agent in
tests/integration/test_deploy_queries.py; that the pod runs, in test_container.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

from meshlens.agent.identity import k8s_watch
from meshlens.agent.kernel import capabilities
from meshlens.exporter.cli import _parser
from tests.manifests import DAEMONSET_DIR, MANIFESTS, all_documents, dashboard, documents, rule_groups

K8S_VERSION = "1.30"
CRD_MODELS = {"ServiceMonitor": monitoring_v1.ServiceMonitor, "PodMonitor": monitoring_v1.PodMonitor,
              "PrometheusRule": monitoring_v1.PrometheusRule}


def _pod() -> Dict[str, Any]:
    (ds,) = documents("daemonset.yaml")
    return ds["spec"]["template"]["spec"]


def _containers() -> List[Dict[str, Any]]:
    return _pod()["initContainers"] + _pod()["containers"]


def _agent() -> Dict[str, Any]:
    (c,) = _pod()["containers"]
    return c


def _pruned(d: Any) -> Any:
    """d without empty values (a model's dump drops them)."""
    if isinstance(d, dict):
        return {k: _pruned(v) for k, v in d.items() if v not in (None, {}, [])}
    if isinstance(d, list):
        return [_pruned(v) for v in d]
    return d


@pytest.mark.parametrize("name,doc", list(all_documents()), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_manifest_validates(name: str, doc: Dict[str, Any]) -> None:
    if doc["kind"] in CRD_MODELS:
        model = CRD_MODELS[doc["kind"]].model_validate(doc)
        # the models ignore unknown fields: a round trip that loses one is a typo in the manifest
        dumped = model.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert _pruned(dumped) == _pruned(doc), f"{name}: fields the {doc['kind']} schema does not know"
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_names_existing_files() -> None:
    k = yaml.safe_load((DAEMONSET_DIR / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization" and k["namespace"] == "meshlens"
    for res in k["resources"]:
        assert (DAEMONSET_DIR / res).is_file(), res
    assert set(MANIFESTS) - set(k["resources"]) == {"podmonitor.yaml"}  # the alternative to the ServiceMonitor
    for gen in k["configMapGenerator"]:
        for f in gen["files"]:
            assert (DAEMONSET_DIR / f.split("=", 1)[-1]).is_file(), f
    image = _agent()["image"]
    assert [i["name"] for i in k["images"]] == [image.rsplit(":", 1)[0]]


def test_namespace_pod_security_level_and_reason() -> None:
    (ns,) = documents("namespace.yaml")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert "hostNetwork" in ns["metadata"]["annotations"]["meshlens.io/pod-security-reason"]


def test_least_privilege() -> None:
    pod = _pod()
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert "hostIPC" not in pod
    features = _parser().parse_args(_agent()["command"][1:] + _agent()["args"]).features.split(",")
    wanted = [n.cap for n in capabilities.needed(features)]  # what `meshlens check` requires, nothing more
    for c in _containers():
        sc = c["securityContext"]
        assert sc["privileged"] is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sorted(sc["capabilities"]["add"]) == sorted(wanted)
        assert "SYS_ADMIN" not in sc["capabilities"]["add"] and "SYS_RESOURCE" not in sc["capabilities"]["add"]
        assert "sat" not in features  # its socket walk would need SYS_ADMIN
        assert sc["seccompProfile"] == {"type": "Unconfined"}  # why: test_container.py's default-profile test
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for ro in ("/sys/kernel/tracing", "/sys/fs/cgroup", "/var/run/netns"):
            assert mounts[ro]["readOnly"] is True, ro
        assert {"/sys/fs/bpf", "/run/meshlens"} <= set(mounts)
        assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    init, agent = _pod()["initContainers"][0], _agent()
    assert init["securityContext"] == agent["securityContext"] and init["volumeMounts"] == agent["volumeMounts"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (ds,) = documents("daemonset.yaml")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert 10 <= pod["terminationGracePeriodSeconds"] <= 60
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_commands_parse_with_the_cli() -> None:
    init, agent = _pod()["initContainers"][0], _agent()
    assert init["command"] == ["meshlens", "check"]
    assert agent["command"] == ["meshlens", "run"]
    args = _parser().parse_args(agent["command"][1:] + agent["args"])
    checked = _parser().parse_args(init["command"][1:] + init["args"])
    assert checked.cmd == "check" and checked.features == args.features  # check what runs
    assert args.cmd == "run" and args.metrics_addr == "0.0.0.0:9433" and args.kubernetes == "on"
    port = int(args.metrics_addr.rsplit(":", 1)[1])
    grpc_port = int(args.grpc_listen.rsplit(":", 1)[1])
    assert agent["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"},
                              {"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"}]
    state = next(m for m in agent["volumeMounts"] if m["name"] == "state")
    assert str(args.state_dir) == state["mountPath"]
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"meshlens=' in setup  # the console script the command names


def test_probes_use_the_metrics_port() -> None:
    agent = _agent()
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_rbac_is_exactly_what_the_watch_lists() -> None:
    role = next(d for d in documents("rbac.yaml") if d["kind"] == "ClusterRole")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for rule in role["rules"]:
        assert sorted(rule["verbs"]) == ["list", "watch"]
    group_of = {"pods": "", "services": "", "endpointslices": "discovery.k8s.io", "jobs": "batch"}
    wanted = {(group_of.get(r, "apps"), r) for r in k8s_watch.ALL_RESOURCES}
    assert granted == wanted
    binding = next(d for d in documents("rbac.yaml") if d["kind"] == "ClusterRoleBinding")
    sa = next(d for d in documents("rbac.yaml") if d["kind"] == "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert _pod()["serviceAccountName"] == sa["metadata"]["name"]


def test_service_and_monitors_select_the_agent() -> None:
    (svc,) = documents("service.yaml")
    labels = _pod() and documents("daemonset.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    (sm,) = documents("servicemonitor.yaml")
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    (pm,) = documents("podmonitor.yaml")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make deps installs it)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}))
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    alerts = {rule["alert"] for g in rule_groups() for rule in g["rules"] if "alert" in rule}
    assert {"MeshlensAgentDown", "MeshlensEventsLost", "MeshlensKernelMapNearlyFull",
            "MeshlensKubernetesWatchDown", "MeshlensEdgeErrorRateHigh"} <= alerts


def test_dashboard_has_the_sections_and_variables() -> None:
    d = dashboard()
    json.dumps(d)
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"namespace", "workload", "datasource"} <= names
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    for section in ("Golden signals", "Top edges", "TCP health", "Per-pod interface", "agents themselves"):
        assert any(section in r for r in rows), section
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            if "Golden" in p["title"] or "TCP" in p["title"]:
                assert all("$namespace" in t["expr"] for t in p["targets"])


def test_relay_follows_the_agents_service() -> None:
    """relay.yaml: its command parses with the real CLI, --agents-service names the headless
    Service's gRPC port (which targets the agent's), and its Role grants only what
    exporter/grpc/discovery.py calls (list and watch EndpointSlices, in this namespace)."""
    from meshlens.exporter.config import relay_settings
    from meshlens.exporter.grpc.discovery import parse_service

    docs = {d["kind"]: d for d in documents("relay.yaml") if d["kind"] != "Service"}
    (relay_svc,) = [d for d in documents("relay.yaml") if d["kind"] == "Service"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["meshlens", "relay"]
    s = relay_settings(_parser().parse_args(c["command"][1:] + c["args"]))
    ns, name, port = parse_service(s.agents_service)
    (svc,) = documents("service.yaml")
    assert (ns, name) == (svc["metadata"]["namespace"], svc["metadata"]["name"]) and svc["spec"]["clusterIP"] == "None"
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == port and grpc["targetPort"] == "grpc"
    assert any(p["name"] == "grpc" for p in _agent()["ports"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(s.listen.rsplit(":", 1)[1]), "metrics": int(s.metrics_addr.rsplit(":", 1)[1])}
    assert {p["targetPort"] for p in relay_svc["spec"]["ports"]} == set(ports)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"]
    assert docs["Role"]["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                      "verbs": ["list", "watch"]}]
    assert docs["Role"]["metadata"]["namespace"] == ns
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]
