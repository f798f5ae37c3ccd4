"""`meshlens run` identity flags: parsing, validation, standalone default, and a kubeconfig
that points the real client at the fake API server."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshlens.agent.identity.model import Workload
from meshlens.agent.identity.setup import add_identity_arguments, identity_from_args, kubernetes_wanted
from tests.unit.fake_apiserver import FakeApiServer, load_objects


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_identity_arguments(p)
    return p.parse_args(list(argv))


def test_defaults_are_standalone_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    setup = identity_from_args(parse("--cidr-names", "10.0.0.0/8=corp"))
    assert setup.watcher is None and setup.status() == {}
    setup.start()
    assert setup.view.local(0, 0, "curl") == Workload("", "", "process", "curl")
    assert setup.view.peer("10.1.1.1") == Workload("", "", "external", "corp")
    setup.stop()


def test_kubernetes_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert not kubernetes_wanted("auto", None) and kubernetes_wanted("auto", "/k") and kubernetes_wanted("on", None)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert kubernetes_wanted("auto", None) and not kubernetes_wanted("off", None)


@pytest.mark.parametrize("argv", [("--cidr-names", "10.0.0.0/8"), ("--pod-ttl", "-1"),
                                  ("--kubernetes", "on", "--kubeconfig", "/nonexistent/kubeconfig")])
def test_bad_flags_are_value_errors(argv) -> None:
    with pytest.raises(ValueError):
        identity_from_args(parse(*argv))


def test_kubeconfig_reaches_the_api_server(tmp_path: Path) -> None:
    objects = load_objects("pods") + load_objects("replicasets")
    with FakeApiServer(objects) as srv:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {srv.url}
contexts:
- name: test
  context: {{cluster: test, user: test}}
current-context: test
users:
- name: test
  user: {{token: not-checked}}
""")
        setup = identity_from_args(parse("--kubeconfig", str(kubeconfig), "--node-name", "node-1"))
        assert setup.watcher is not None
        setup.start()
        try:
            assert setup.watcher.wait_synced(5)
            assert setup.view.peer("10.244.1.12") == Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment",
                                                              "frontend")
            assert setup.status()["pods"].objects == 8
        finally:
            setup.stop()
