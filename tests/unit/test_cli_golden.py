"""CLI client commands on the fixed snapshot (tests/unit/api_fixture.py), through the real
API app: the printed tables equal the golden files in tests/unit/golden/ (regenerate with
MESHLENS_GOLDEN_UPDATE=1 and review the diff), `-o json` is the API's JSON, and an
unreachable agent gives one line a person understands."""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from meshlens.exporter.cli import _parser
from meshlens.exporter.client import commands
from meshlens.exporter.client.http import AgentClient
from tests.unit.api_fixture import app_and_agent

GOLDEN = Path(__file__).with_name("golden")


def run_cli(argv, monkeypatch) -> str:
    app, _ = app_and_agent()
    test_client = TestClient(app)
    monkeypatch.setattr(commands, "AgentClient", lambda server, token: AgentClient(server, token, http=test_client))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    return out.getvalue()


@pytest.mark.parametrize("name, argv", [
    ("observe", ["observe"]),
    ("observe_pod", ["observe", "--pod", "frontend", "--since", "30s"]),
    ("stat", ["stat", "deploy", "-t", "10m"]),
    ("stat_to", ["stat", "--to", "deploy/api", "-t", "10m", "-n", "shop"]),
    ("routes", ["routes", "deploy/api", "-t", "10m"]),
    ("edges", ["edges", "-t", "10m"]),
    ("servicemap_dot", ["servicemap", "-t", "10m"]),
])
def test_golden_output(name, argv, monkeypatch) -> None:
    got = run_cli(argv, monkeypatch)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("MESHLENS_GOLDEN_UPDATE"):
        path.write_text(got)
    assert got == path.read_text()


def test_json_output_is_the_api_answer(monkeypatch) -> None:
    got = json.loads(run_cli(["stat", "-o", "json", "-t", "10m"], monkeypatch))
    app, _ = app_and_agent()
    assert got == TestClient(app).get("/api/v1/stat", params={"window": "10m"}).json()


def test_top_aggregates_tap_events() -> None:
    ev = [("request_init", {"id": 1, "source": {"namespace": "a", "pod": "p"}, "destination": {"namespace": "a", "pod": "q"},
                            "method": "GET", "route": "/x"}),
          ("response_init", {"id": 1, "status": 503, "latency_ms": 2.0}),
          ("request_init", {"id": 2, "source": {"namespace": "a", "pod": "p"}, "destination": {"namespace": "a", "pod": "q"},
                            "method": "GET", "route": "/x"}),
          ("response_init", {"id": 2, "status": 200, "latency_ms": 1.0})]
    assert commands.top_rows(ev) == [{"source": "a/p", "destination": "a/q", "method": "GET", "route": "/x", "count": 2,
                                      "best_ms": 1.0, "worst_ms": 2.0, "successes": 1, "failures": 1}]


def test_unreachable_agent_is_one_clear_line(capsys) -> None:
    from tests.integration.servers import free_port

    args = _parser().parse_args(["stat", "--server", f"127.0.0.1:{free_port()}"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshlens: cannot reach the meshlens agent at http://127.0.0.1:") and "meshlens run" in err
    assert err.count("\n") == 1
