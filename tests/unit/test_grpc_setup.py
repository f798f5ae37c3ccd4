"""The gRPC Observer's set-up: agent discovery from a headless Service's EndpointSlices (the
real kubernetes client against the local fake API server), the relay's and the agent's
gRPC settings, and `meshlens observe|status` over grpc:// against a real in-process server."""
from __future__ import annotations

import argparse
import copy
import io
import json
import threading
import time

import pytest

from meshlens.exporter.cli import _parser, main
from meshlens.exporter.config import ConfigError, load, relay_settings
from meshlens.exporter.grpc.discovery import parse_service, service_agents
from meshlens.exporter.grpc.observer import serve_agent
from meshlens.exporter.proto import observer_pb2 as pb
from tests.unit.fake_apiserver import FakeApiServer, load_objects
from tests.unit.grpc_fakes import FakeAgent, conn, tap
from tests.unit.test_grpc_observer import IDENT, wait


def _agents_slice(name: str, ips, ready=True, namespace: str = "kube-system", suffix: str = "x"):
    s = copy.deepcopy(load_objects("endpointslices")[0])
    s["metadata"].update(name=f"{name}-{suffix}", namespace=namespace, uid=f"uid-{name}-{namespace}-{suffix}")
    s["metadata"]["labels"]["kubernetes.io/service-name"] = name
    s["endpoints"] = [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": f"node-{i}"}
                      for i, ip in enumerate(ips)]
    return s


def test_agents_from_the_headless_service_endpoints() -> None:
    """The relay's discovery lists and watches only its Service's slices in its namespace
    (what its namespaced Role allows), follows ready endpoints, and hands the relay every
    change as it happens, not on a poll; a cut watch resumes without a spurious change."""
    objects = [_agents_slice("meshlens", ["10.0.0.11", "10.0.0.12"]),
               _agents_slice("meshlens", ["10.0.0.13"], ready=False, suffix="y"),          # not ready: not followed
               _agents_slice("other", ["10.0.0.99"]),                           # another service
               _agents_slice("meshlens", ["10.9.9.9"], namespace="default")]   # same name, other namespace
    with FakeApiServer(objects) as api:
        sa = service_agents("kube-system/meshlens:4244", host=api.url)
        got: list = []
        stop = threading.Event()
        t = threading.Thread(target=sa.run, args=(got.append, stop))
        t.start()
        try:
            assert wait(lambda: got, 5)
            assert got == [["10.0.0.11:4244", "10.0.0.12:4244"]]
            api.add(_agents_slice("meshlens", ["fd00::7"], suffix="v6"))      # a new slice appears
            assert wait(lambda: len(got) == 2, 2)
            assert got[-1] == ["10.0.0.11:4244", "10.0.0.12:4244", "[fd00::7]:4244"]
            api.add(_agents_slice("meshlens", ["10.0.0.13"], suffix="y"))     # the not-ready one is ready
            assert wait(lambda: len(got) == 3, 2)
            assert got[-1] == ["10.0.0.11:4244", "10.0.0.12:4244", "10.0.0.13:4244", "[fd00::7]:4244"]
            api.add(_agents_slice("other", ["10.0.0.98"]))                    # not ours: no change
            api.add(_agents_slice("meshlens", ["10.9.9.8"], namespace="default"))
            api.drop_watches()                                                # resumes from its resourceVersion
            api.delete("EndpointSlice", "kube-system", "meshlens-v6")         # a node leaves
            assert wait(lambda: len(got) == 4, 5)
            assert got[-1] == ["10.0.0.11:4244", "10.0.0.12:4244", "10.0.0.13:4244"]
            time.sleep(0.3)
            assert len(got) == 4, got                                         # nothing else changed
            # every request was namespaced and selected by the Service's label
            paths = {p for p, _ in api.requests}
            assert paths == {"/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"}, paths
            assert all(q.get("labelSelector") == "kubernetes.io/service-name=meshlens" for _, q in api.requests)
            assert api.watch_requests("EndpointSlice"), "no watch was opened"
        finally:
            stop.set()
            t.join(10)
            sa.api.close()
        assert not t.is_alive()


def test_parse_service() -> None:
    assert parse_service("meshlens:4244") == ("kube-system", "meshlens", 4244)
    assert parse_service("obs/meshlens-agent:4244") == ("obs", "meshlens-agent", 4244)
    for bad in ("meshlens", "meshlens:0", "x:http", ":4244"):
        with pytest.raises(ValueError):
            parse_service(bad)


def _relay_args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["relay", *argv])


def test_relay_settings_name_the_bad_flag(tmp_path) -> None:
    s = relay_settings(_relay_args("--agents", "127.0.0.1:4244, 10.0.0.2:4244", "--sort-window", "0.5"))
    assert s.agents == "127.0.0.1:4244,10.0.0.2:4244" and s.sort_window == 0.5 and s.client_tls() is None
    for argv, word in ((["--agents", "nohost"], "--agents"), ([], "--agents-service"),
                       (["--agents", "a:1", "--tls-ca", str(tmp_path / "missing.pem")], "--tls-ca"),
                       (["--agents", "a:1", "--sort-window", "0"], "--sort-window"),
                       (["--agents-service", "ns/x"], "--agents-service")):
        with pytest.raises(ConfigError) as err:
            relay_settings(_relay_args(*argv))
        assert word in str(err.value), (argv, str(err.value))


def test_agent_grpc_settings(tmp_path) -> None:
    pem = tmp_path / "c.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load({"grpc_listen": "0.0.0.0:4244", "grpc_tls_cert": str(pem), "grpc_tls_key": str(pem)})
    assert s.grpc_tls() is not None and s.grpc_tls().client_ca is None
    assert load({}).grpc_listen == "" and load({}).grpc_tls() is None
    with pytest.raises(ConfigError, match="grpc_tls_key go together"):
        load({"grpc_tls_cert": str(pem)})
    with pytest.raises(ConfigError, match="grpc_listen"):
        load({"grpc_listen": "4244"})


def test_observe_and_status_over_grpc(capsys) -> None:
    agent = FakeAgent(IDENT)
    obs = serve_agent(agent, "node-a", "127.0.0.1:0")
    try:
        server = f"grpc://127.0.0.1:{obs.server.port}"
        out = {}

        def follow() -> None:
            buf = io.StringIO()
            from meshlens.exporter.client.grpc_client import observe
            a = _parser().parse_args(["observe", "--server", server, "-f", "--http-status", "5+", "--last", "0"])
            out["rc"] = observe(a, {"http_status": "5+"}, buf)
            out["text"] = buf.getvalue()
        t = threading.Thread(target=follow, daemon=True)
        t.start()
        assert wait(lambda: agent.tcp.following)
        agent.tap = [tap(102, "server", "GET", 503, "/items/{id}", "10.1.0.3", 80, "10.1.0.2"),
                     tap(102, "server", "GET", 200, "/items/{id}", "10.1.0.3", 80, "10.1.0.2")]
        agent.tcp.emit(conn("close", 101, "outbound", "10.1.0.2", 41000, "10.1.0.3", 80, bytes_sent=4099))
        assert wait(lambda: obs.feed.hub.seen_flows == 5)
        obs.server.stop(0)       # ends the stream: the command returns
        t.join(5)
        lines = out["text"].splitlines()
        assert len(lines) == 1 and "shop/frontend-7d4b9c6f5d-x2kq9 (10.1.0.2) <- shop/api-5f8d7b9c4-q8w2e (10.1.0.3:80)" in lines[0]  # as hubble prints a reply
        assert "HTTP 503 GET /items/{id}" in lines[0] and "node-a" in lines[0]
    finally:
        obs.stop()
    obs = serve_agent(agent, "node-a", "127.0.0.1:0")
    try:
        agent.tcp.emit(conn("open", 101, "outbound", "10.1.0.2", 41001, "10.1.0.3", 80))  # nobody follows: not kept
        assert main(["status", "--server", f"127.0.0.1:{obs.server.port}", "-o", "json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["nodes"][0]["name"] == "node-a" and st["status"].get("seen_flows", "0") == "0"
        assert main(["observe", "--server", "http://127.0.0.1:1", "-f"]) == 2
        assert "needs the flow stream" in capsys.readouterr().err
        assert main(["observe", "--server", f"grpc://127.0.0.1:{obs.server.port}", "--http-status", "6"]) == 1
        assert "INVALID_ARGUMENT: http_status" in capsys.readouterr().err
    finally:
        obs.stop()
