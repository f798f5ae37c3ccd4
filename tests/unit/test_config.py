"""Settings (exporter/config.py): file < environment < flags, one clear error per bad value
naming the field and its source, defaults that round-trip through
`meshlens config --print-defaults`, and an auth token that never comes from a flag."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from meshlens.exporter import cli
from meshlens.exporter.config import ConfigError, Settings, explicit_flags, load, print_defaults, resolve_run_args


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("MESHLENS_"):
            monkeypatch.delenv(k)


def run_args(argv):
    parser = cli._parser()
    return resolve_run_args(parser, parser.parse_args(argv), argv)


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "meshlens.yaml"
    f.write_text("max_flows: 101\nflow_ttl: 7.5\nsweep_interval: 3\nfeatures: l4,tc\n")
    monkeypatch.setenv("MESHLENS_FLOW_TTL", "8.5")
    monkeypatch.setenv("MESHLENS_SWEEP_INTERVAL", "4")
    args = run_args(["run", "--config", str(f), "--sweep-interval", "5"])
    assert args.max_flows == 101          # file only
    assert args.flow_ttl == 8.5           # environment over file
    assert args.sweep_interval == 5.0     # flag over both
    assert args.features == "l4,tc"
    cfg = args.settings.agent_config()
    assert cfg.features == ("l4", "tc") and cfg.tcp.max_rollups == 101 and cfg.tcp.rollup_ttl_s == 8.5
    assert cfg.sweep_interval_s == 5.0


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("conns_map_size: 4099\n")
    monkeypatch.setenv("MESHLENS_CONFIG", str(f))
    assert run_args(["run"]).settings.agent_config().tcp.conns_max_entries == 4099


def test_flag_defaults_do_not_override_file(tmp_path: Path) -> None:
    """A flag left at its default is not 'given': the file's value stands."""
    f = tmp_path / "c.yaml"
    f.write_text("metrics_addr: 127.0.0.1:9999\n")
    assert run_args(["run", "--config", str(f)]).metrics_addr == "127.0.0.1:9999"


BAD = [
    ("max_flows", "0", "--max-flows", "greater than 0"),
    ("sweep_interval", "-1", "--sweep-interval", "greater than 0"),
    ("flow_ttl", "0", "--flow-ttl", "greater than 0"),
    ("conns_map_size", "-5", "--conns-map-size", "greater than 0"),
    ("map_window", "0", "--map-window", "greater than 0"),
    ("map_interval", "0", "--map-interval", "greater than 0"),
    ("pod_ttl", "-1", "--pod-ttl", "greater than or equal to 0"),
    ("features", "l4,gpu", "--features", "unknown gpu"),
    ("metrics_addr", "localhost", "--metrics-addr", "want HOST:PORT"),
    ("kubernetes", "maybe", "--kubernetes", None),
    ("cidr_names", "10.0.0.0/33=x", "--cidr-names", None),
    ("http_sample_every", "-2", "--http-sample-every", "greater than or equal to 0"),
    ("namespaces_exclude", "kube-system,Bad_Name", "--namespaces-exclude", "not a namespace name: Bad_Name"),
    ("external_peers_per_workload", "-1", "--external-peers-per-workload", "greater than or equal to 0"),
    ("max_series", "0", "--max-series", "greater than 0"),
]


@pytest.mark.parametrize("field,value,flag,words", BAD, ids=[b[0] for b in BAD])
def test_bad_value_from_each_source_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    field: str, value: str, flag: str, words) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({field: value}))
    with pytest.raises(ConfigError) as exc:
        load({}, str(f))
    msg = str(exc.value)
    assert msg.startswith(f"{field}: ") and f"(from config file {f})" in msg and ";" not in msg
    if words:
        assert words in msg
    monkeypatch.setenv(f"MESHLENS_{field.upper()}", value)
    with pytest.raises(ConfigError, match=rf"^{field}: .*\(from \$MESHLENS_{field.upper()}\)$"):
        load({})
    monkeypatch.delenv(f"MESHLENS_{field.upper()}")
    if field != "kubernetes":  # argparse's own choices refuse it first, also naming the flag
        with pytest.raises(ConfigError, match=rf"^{field}: .*\(from flag {flag}\)$"):
            run_args(["run", flag, value])


def test_unknown_setting_in_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("max_flow: 3\n")
    with pytest.raises(ConfigError, match=r"^max_flow: unknown setting \(from config file"):
        load({}, str(f))


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load({}, str(tmp_path / "nope.yaml"))
    f = tmp_path / "bad.yaml"
    f.write_text("max_flows: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load({}, str(f))


def test_print_defaults_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLENS_MAX_FLOWS", "5")  # the environment does not leak into defaults
    text = print_defaults()
    monkeypatch.delenv("MESHLENS_MAX_FLOWS")
    f = tmp_path / "defaults.yaml"
    f.write_text(text)
    assert load({}, str(f)).model_dump() == Settings().model_dump()
    assert yaml.safe_load(text)["max_flows"] == 10_000
    assert "auth_token:" not in text.replace("# auth_token:", "")


def test_print_defaults_command() -> None:
    out = subprocess.run([sys.executable, "-m", "meshlens.exporter.cli", "config", "--print-defaults"],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out) == yaml.safe_load(print_defaults())


def test_parser_defaults_match_the_model() -> None:
    """--help shows the parser's defaults; they must be the model's."""
    run = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    checked = 0
    for action in run._actions:
        if action.dest in Settings.model_fields and action.dest not in ("node_name",):
            model_default = Settings.model_fields[action.dest].default
            assert action.default == model_default or str(action.default) == str(model_default), action.dest
            checked += 1
    assert checked >= 14


def test_token_from_file_or_environment_never_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    assert not [o for a in run._actions for o in a.option_strings if o.startswith("--auth-token") and "file" not in o]
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["run", "--auth-token", "s3cret"])  # nor as an abbreviation
    tok = tmp_path / "token"
    tok.write_text("from-file\n")
    assert run_args(["run", "--auth-token-file", str(tok)]).settings.token() == "from-file"
    monkeypatch.setenv("MESHLENS_AUTH_TOKEN", "from-env")
    s = run_args(["run"]).settings
    assert s.token() == "from-env"
    assert "from-env" not in repr(s) and "from-env" not in print_defaults()
    with pytest.raises(ConfigError, match="auth_token_file: .* not a readable file"):
        run_args(["run", "--auth-token-file", str(tmp_path / "missing")])


def test_cli_exits_2_with_the_message(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["run", "--max-flows", "0"]) == 2
    assert capsys.readouterr().err.strip() == "meshlens: max_flows: Input should be greater than 0 (from flag --max-flows)"


def test_explicit_flags_only_given_ones() -> None:
    flags: Dict = explicit_flags(cli._parser(), ["run", "--max-flows", "7", "--kubernetes", "off"], "run")
    assert flags == {"max_flows": 7, "kubernetes": "off"}
