"""`meshlens run` configuration: one model read from a YAML file (`--config`, or
$MESHLENS_CONFIG), then MESHLENS_* environment variables, then command-line flags, each
overriding the one before; validated once, before anything touches the kernel.

Place in the data flow: the composition root (exporter/cli.py) turns argv into Settings
here, and Settings into the AgentConfig, identity flags and listen address it starts.
Field names are the flags' names (`--max-flows` is `max_flows`, $MESHLENS_MAX_FLOWS and
`max_flows:` in the file). The auth token is read from a file (`auth_token_file`) or
from $MESHLENS_AUTH_TOKEN, never from a flag: a flag's value is visible to every user in
`ps`. `meshlens config --print-defaults` prints the defaults as a file this module reads
back to the same settings.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Type

import yaml
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from meshlens.agent.identity.resolver import DEFAULT_TTL_S, parse_cidr_names
from meshlens.agent.lifecycle import DEFAULT_STATE_DIR
from meshlens.agent.runner import FEATURES, AgentConfig
from meshlens.agent.sources.l7.http import HttpConfig
from meshlens.agent.sources.saturation.source import SatConfig
from meshlens.agent.sources.tcp.source import TcpConfig

from .http_server import parse_addr

ENV_PREFIX = "MESHLENS_"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace name
CONFIG_ENV = "MESHLENS_CONFIG"
NOT_FLAGS = {"auth_token"}  # settable from the file or the environment only


class ConfigError(ValueError):
    """Invalid configuration; the message names each bad field and where it came from."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # listen addresses and auth
    metrics_addr: str = Field("127.0.0.1:9433", description="HOST:PORT for /metrics")
    auth_token_file: Optional[Path] = Field(None, description="file holding the API bearer token")
    auth_token: Optional[SecretStr] = Field(None, description="API bearer token ($MESHLENS_AUTH_TOKEN or the file only)")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="lock file directory (one agent per node)")
    # the gRPC Observer (exporter/grpc/observer.py)
    grpc_listen: str = Field("", description="HOST:PORT of the gRPC Observer (flow stream); empty = off")
    grpc_tls_cert: Optional[Path] = Field(None, description="PEM certificate of the gRPC port (TLS on when set)")
    grpc_tls_key: Optional[Path] = Field(None, description="PEM private key of grpc_tls_cert")
    grpc_tls_client_ca: Optional[Path] = Field(None, description="PEM CA that signs client certificates "
                                                                 "(mTLS: clients without one are refused)")
    grpc_queue_size: PositiveInt = Field(4096, description="flows queued per gRPC client; a client that falls "
                                                           "further behind gets a lost_events count instead")
    grpc_pods_only: bool = Field(False, description="the flow stream carries only events whose local end is a "
                                                    "pod the identity view names (leaves host processes out)")
    # what runs
    features: str = Field("l4,l7,tc,sat", description="capture layers: l4 (always on), l7, tc, sat")
    l7_source: Literal["auto", "packets", "syscalls"] = Field(
        "auto", description="where L7 (HTTP/DNS) is parsed: packets at pod veths, syscalls, or auto")
    http_sample_every: int = Field(0, ge=0, description="1 in N HTTP requests kept as a tap sample; 0 = off")
    # intervals and windows
    sweep_interval: PositiveFloat = Field(1.0, description="seconds between kernel map sweeps")
    map_window: PositiveFloat = Field(60.0, description="service map window in seconds")
    map_interval: PositiveFloat = Field(5.0, description="seconds between service map records")
    history_interval: PositiveFloat = Field(5.0, description="seconds between the API's history records (windows)")
    history_length: PositiveInt = Field(13, description="history records kept (the API's longest window is "
                                        "history_interval x (history_length - 1))")
    socket_walk_interval: PositiveFloat = Field(10.0, description="seconds between saturation's walks over every "
                                                                  "namespace's sockets")
    # bounds: kernel maps, flow table, cardinality
    conns_map_size: PositiveInt = Field(65536, description="kernel TCP connection map entries")
    rollups_map_size: PositiveInt = Field(16384, description="kernel TCP rollup map entries; beyond them deltas "
                                                           "travel the ring buffer (counted, totals stay exact)")
    http_conns_map_size: PositiveInt = Field(16384, description="kernel HTTP connection map entries")
    http_stats_map_size: PositiveInt = Field(8192, description="kernel HTTP series map entries")
    max_flows: PositiveInt = Field(10_000, description="cap on flow rollups (series per metric)")
    max_series: PositiveInt = Field(20_000, description="node-wide series budget of the TCP flow table: rollups "
                                                         "are capped at this divided by the series one rollup exports")
    external_peers_per_workload: int = Field(32, ge=0, description="external peer addresses kept per workload; "
                                                                    "the rest fold into one `external` peer (0 = no cap)")
    peer_rerank_interval: PositiveFloat = Field(30.0, description="seconds between rankings of kept and folded "
                                                                   "external peers by bytes (the busiest are kept)")
    # TTLs
    flow_ttl: PositiveFloat = Field(600.0, description="seconds before an idle rollup stops being exported")
    pod_ttl: float = Field(DEFAULT_TTL_S, ge=0, description="seconds a deleted pod's series stay")
    # identity
    kubernetes: Literal["auto", "on", "off"] = Field("auto", description="watch the Kubernetes API")
    node_name: str = Field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname(),
                           description="this node's name (default $NODE_NAME, else the host name)")
    kubeconfig: Optional[str] = Field(None, description="kubeconfig file (default: in-cluster service account)")
    cidr_names: str = Field("", description='names for external peers, e.g. "10.0.0.0/8=corp"')
    namespaces_include: str = Field("", description="export only series of these namespaces (comma-separated; "
                                                    "empty: all)")
    namespaces_exclude: str = Field("", description="never export series naming these namespaces (comma-separated)")

    @field_validator("metrics_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v)
        return v

    @field_validator("grpc_listen")
    @classmethod
    def _grpc_addr(cls, v: str) -> str:
        if v:
            parse_addr(v)
        return v

    @field_validator("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca")
    @classmethod
    def _pem_file(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a readable file")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together")
        if self.grpc_tls_client_ca is not None and self.grpc_tls_cert is None:
            raise ValueError("grpc_tls_client_ca (mTLS) needs grpc_tls_cert and grpc_tls_key")
        return self

    @field_validator("features")
    @classmethod
    def _features(cls, v: str) -> str:
        given = {f.strip() for f in v.split(",") if f.strip()}
        unknown = given - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown {', '.join(sorted(unknown))} (choose from {', '.join(FEATURES)})")
        return ",".join(f for f in FEATURES if f in given | {"l4"})

    @field_validator("cidr_names")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        parse_cidr_names(v)
        return v

    @field_validator("namespaces_include", "namespaces_exclude")
    @classmethod
    def _namespaces(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",") if n.strip()]
        bad = [n for n in names if not _DNS_LABEL.fullmatch(n)]
        if bad:
            raise ValueError(f"not a namespace name: {', '.join(bad)}")
        return ",".join(names)

    @field_validator("auth_token_file")
    @classmethod
    def _token_file(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a readable file")
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls: Type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> Tuple[PydanticBaseSettingsSource, ...]:
        # first wins: flags (init kwargs) > environment > the YAML file (see load())
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    # ---- what the composition root builds from it

    def token(self) -> Optional[str]:
        """The API token: $MESHLENS_AUTH_TOKEN (or the file's auth_token), else auth_token_file's content."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text().strip() or None
        return None

    def max_rollups(self) -> int:
        """The flow table's cap: --max-flows, lowered to what the series budget allows."""
        from .prometheus.tcp import series_per_rollup

        return max(1, min(self.max_flows, self.max_series // series_per_rollup()))

    def agent_config(self) -> AgentConfig:
        return AgentConfig(
            sweep_interval_s=self.sweep_interval,
            map_window_s=self.map_window,
            map_interval_s=self.map_interval,
            history_interval_s=self.history_interval,
            history_len=self.history_length,
            l7_source=self.l7_source,
            features=tuple(sorted(self.features.split(","))),
            tcp=TcpConfig(conns_max_entries=self.conns_map_size, rollups_max_entries=self.rollups_map_size,
                          max_rollups=self.max_rollups(), rollup_ttl_s=self.flow_ttl,
                          max_peers_per_workload=self.external_peers_per_workload,
                          peer_rerank_s=self.peer_rerank_interval),
            sat=SatConfig(walk_interval_s=self.socket_walk_interval),
            http=HttpConfig(conns_max_entries=self.http_conns_map_size, stats_max_entries=self.http_stats_map_size,
                            sample_every=self.http_sample_every),
        )

    def grpc_tls(self) -> Any:
        """The gRPC port's ServerTls, or None for plain text."""
        if self.grpc_tls_cert is None or self.grpc_tls_key is None:
            return None
        from .grpc.tls import ServerTls

        return ServerTls(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_client_ca)

    def namespace_filter(self, view: Any) -> Any:
        """`view` wrapped so that left-out namespaces are not exported (unchanged if none)."""
        if not (self.namespaces_include or self.namespaces_exclude):
            return view
        from meshlens.agent.identity.namespaces import NamespaceFilter

        split = lambda v: [n for n in v.split(",") if n]  # noqa: E731
        return NamespaceFilter(view, split(self.namespaces_include), split(self.namespaces_exclude))

    def defaults_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"auth_token"})
        lines = ["# meshlens run configuration (meshlens config --print-defaults).",
                 "# Precedence: this file < MESHLENS_<FIELD> environment variables < command-line flags.",
                 "# auth_token: only here or in $MESHLENS_AUTH_TOKEN, never as a flag."]
        for name, value in data.items():
            desc = type(self).model_fields[name].description
            lines.append(f"# {desc}")
            lines.append(yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False).rstrip())
        return "\n".join(lines) + "\n"


def load(flags: Dict[str, Any], config_file: Optional[str] = None) -> Settings:
    """Settings from the file, the environment and `flags` (only the flags given). Raises
    ConfigError with one line per bad field, naming it and the source."""
    path = config_file or os.environ.get(CONFIG_ENV)
    if path and not Path(path).is_file():
        raise ConfigError(f"config file {path}: not found")
    cls: Type[Settings] = Settings
    if path:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return cls(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, flags, path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None


def _describe(exc: ValidationError, flags: Dict[str, Any], path: Optional[str]) -> str:
    out = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        if field in flags:
            where = f"flag --{field.replace('_', '-')}"
        elif ENV_PREFIX + field.upper() in os.environ:
            where = f"${ENV_PREFIX}{field.upper()}"
        elif path:
            where = f"config file {path}"
        else:
            where = "default"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        out.append(f"{field}: {msg} (from {where})")
    return "; ".join(out)


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], command: str) -> Dict[str, Any]:
    """The options of `command` given on the command line (not their defaults), by field name."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    saved = [(a, a.default) for a in sub._actions]
    for a, _ in saved:
        a.default = argparse.SUPPRESS
    try:
        ns = parser.parse_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    return {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}


def resolve_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """`args` of `meshlens run` with every setting from file < env < flags; raises ConfigError."""
    settings = load(explicit_flags(parser, argv, "run"), getattr(args, "config", None))
    merged = vars(args) | settings.model_dump(exclude={"auth_token"})
    merged["settings"] = settings
    return argparse.Namespace(**merged)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"YAML settings file (default ${CONFIG_ENV}); environment and flags override it")
    parser.add_argument("--auth-token-file", default=None, metavar="FILE",
                        help="file holding the API bearer token (or set $MESHLENS_AUTH_TOKEN)")
    for name in ("namespaces_include", "namespaces_exclude"):
        field = Settings.model_fields[name]
        parser.add_argument(f"--{name.replace('_', '-')}", default=field.default, metavar="NS,...", help=field.description)
    g = parser.add_argument_group("gRPC Observer (flow stream)")
    for name in ("grpc_listen", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca", "grpc_queue_size"):
        field = Settings.model_fields[name]
        kind = int if isinstance(field.default, int) else str
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default, help=field.description)
    g.add_argument("--grpc-pods-only", action="store_true", default=False,
                   help=Settings.model_fields["grpc_pods_only"].description)
    for name in ("history_interval", "history_length", "max_series", "external_peers_per_workload", "peer_rerank_interval", "http_sample_every", "http_conns_map_size",
                 "http_stats_map_size"):
        field = Settings.model_fields[name]
        kind = float if isinstance(field.default, float) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default, help=field.description)


def print_defaults() -> str:
    """The defaults as a settings file (environment and files ignored)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(ENV_PREFIX)}
    try:
        return Settings().defaults_yaml()
    finally:
        os.environ.update(saved)


# ---- `meshlens relay` ----------------------------------------------------------------------

class RelaySettings(BaseModel):
    """`meshlens relay` settings (flags, or MESHLENS_RELAY_* in the environment for the list)."""

    model_config = {"extra": "forbid"}

    listen: str = Field("127.0.0.1:4245", description="HOST:PORT of the relay's Observer API")
    metrics_addr: str = Field("127.0.0.1:9435", description="HOST:PORT of the relay's /metrics")
    agents: str = Field("", description="agents to follow: HOST:PORT,... (their --grpc-listen)")
    agents_service: str = Field("", description="or the agents' headless Service: [NAMESPACE/]NAME:PORT, its "
                                               "endpoints read through the Kubernetes API")
    kubeconfig: Optional[str] = Field(None, description="kubeconfig for --agents-service (default: in-cluster)")
    sort_window: PositiveFloat = Field(2.0, description="seconds flows are held to merge the streams in time order")
    max_buffered: PositiveInt = Field(100_000, description="flows the sort window holds at most")
    queue_size: PositiveInt = Field(8192, description="flows queued per client of the relay")
    # to the agents
    tls_ca: Optional[Path] = Field(None, description="PEM CA the agents' certificates must be signed by (TLS on)")
    tls_cert: Optional[Path] = Field(None, description="PEM client certificate for agents that ask (mTLS)")
    tls_key: Optional[Path] = Field(None, description="PEM key of --tls-cert")
    tls_server_name: Optional[str] = Field(None, description="name the agents' certificates carry, if not their address")
    # its own port
    grpc_tls_cert: Optional[Path] = Field(None, description="PEM certificate of the relay's port (TLS on when set)")
    grpc_tls_key: Optional[Path] = Field(None, description="PEM key of --grpc-tls-cert")
    grpc_tls_client_ca: Optional[Path] = Field(None, description="PEM CA of client certificates (mTLS)")

    @field_validator("listen", "metrics_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v)
        return v

    @field_validator("agents")
    @classmethod
    def _agents(cls, v: str) -> str:
        items = [a.strip() for a in v.split(",") if a.strip()]
        for a in items:
            parse_addr(a)
        return ",".join(items)

    @field_validator("agents_service")
    @classmethod
    def _service(cls, v: str) -> str:
        if v:
            from .grpc.discovery import parse_service

            parse_service(v)
        return v

    @field_validator("tls_ca", "tls_cert", "tls_key", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca")
    @classmethod
    def _pem(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a readable file")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RelaySettings":
        if not self.agents and not self.agents_service:
            raise ValueError("give --agents HOST:PORT,... or --agents-service [NAMESPACE/]NAME:PORT")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("--grpc-tls-cert and --grpc-tls-key go together")
        return self

    def client_tls(self) -> Any:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        from .grpc.tls import ClientTls

        return ClientTls(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)

    def server_tls(self) -> Any:
        if self.grpc_tls_cert is None or self.grpc_tls_key is None:
            return None
        from .grpc.tls import ServerTls

        return ServerTls(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_client_ca)


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in RelaySettings.model_fields.items():
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default, help=field.description)


def relay_settings(args: argparse.Namespace) -> RelaySettings:
    """RelaySettings from parsed flags; ConfigError naming each bad one."""
    given = {k: getattr(args, k) for k in RelaySettings.model_fields if getattr(args, k, None) is not None}
    env_agents = os.environ.get("MESHLENS_RELAY_AGENTS")
    if env_agents and not given.get("agents"):
        given["agents"] = env_agents
    try:
        return RelaySettings(**given)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"--{field.replace('_', '-')}: {msg}" if field else msg)
        raise ConfigError("; ".join(parts)) from None
