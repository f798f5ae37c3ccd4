"""`meshlens` command line: `run` starts the agent (standalone on this node), its one HTTP
port (metrics, REST API) and optionally its gRPC Observer; `relay` merges every agent's flow
stream; `check` reports whether this kernel can run it, `config` prints the settings, and
observe/stat/routes/edges/top/tap/servicemap/status query a running agent or relay. The
console-script entry point of the package."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import List, Optional

from meshlens.agent.identity.setup import add_identity_arguments, identity_from_args
from meshlens.agent.lifecycle import DEFAULT_STATE_DIR, AlreadyRunning, InstanceLock, cleanup_stale_pins, install_stop_handlers
from meshlens.agent.runner import Agent, AgentConfig, default_sources

from pydantic import ValidationError

from .config import (ConfigError, Settings, add_config_arguments, add_relay_arguments, print_defaults, relay_settings,
                     resolve_run_args)

log = logging.getLogger("meshlens")

EPILOG = """examples:
  meshlens check                                 # can this node run the agent?
  meshlens run --metrics-addr 127.0.0.1:9433     # standalone agent, Prometheus on :9433
  curl -s 127.0.0.1:9433/metrics | grep meshlens_tcp_
  meshlens run --grpc-listen 127.0.0.1:4244      # ... and the gRPC flow stream
  meshlens relay --agents node-a:4244,node-b:4244 --listen 127.0.0.1:4245
  meshlens observe --server grpc://127.0.0.1:4245 -f --namespace shop
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshlens", description="Sidecarless eBPF telemetry agent.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent on this node", allow_abbrev=False)  # no --auth-token prefix
    run.add_argument("--metrics-addr", default="127.0.0.1:9433", help="HOST:PORT for /metrics (default %(default)s)")
    run.add_argument("--sweep-interval", type=float, default=1.0, help="seconds between kernel map sweeps")
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="lock file directory")
    run.add_argument("--max-flows", type=int, default=10_000, help="cap on flow rollups (series per metric)")
    run.add_argument("--flow-ttl", type=float, default=600.0, help="seconds before an idle rollup stops being exported")
    run.add_argument("--conns-map-size", type=int, default=65536, help="kernel connection map entries")
    run.add_argument("--rollups-map-size", type=int, default=16384,
                     help="kernel rollup map entries; beyond them deltas travel the ring buffer (counted)")
    run.add_argument("--features", default="l4,l7,tc,sat",
                     help="capture layers, comma-separated: l4 (TCP, always on), l7 (HTTP/DNS, see --l7-source), "
                          "tc (per-pod interface counters), sat (saturation: drops, queues, errors, ports, "
                          "conntrack); default %(default)s")
    run.add_argument("--socket-walk-interval", type=float, default=10.0,
                     help="seconds between saturation's walks over every namespace's sockets (accept queues, "
                          "zero windows, ephemeral ports, conntrack); default %(default)s")
    run.add_argument("--l7-source", default="auto", choices=["auto", "packets", "syscalls"],
                     help="where HTTP/DNS are parsed: packets at pod veths (tc), syscall tracepoints "
                          "(names the process), or auto: packets for pod traffic, syscalls for the rest "
                          "(default %(default)s)")
    run.add_argument("--map-window", type=float, default=60.0, help="service map window in seconds")
    run.add_argument("--map-interval", type=float, default=5.0, help="seconds between service map records")
    add_identity_arguments(run)
    add_config_arguments(run)
    check = sub.add_parser("check", help="check that this kernel can run the agent")
    check.add_argument("--features", default="l4,l7,tc,sat", help="the capture layers to check for (as `run`)")
    relay = sub.add_parser("relay", help="follow every agent's flow stream and serve them merged (gRPC Observer)",
                           allow_abbrev=False)
    add_relay_arguments(relay)
    cfg = sub.add_parser("config", help="print the settings file format")
    cfg.add_argument("--print-defaults", action="store_true", required=True,
                     help="print every setting with its default, as a file `run --config` reads")
    from meshlens.exporter.client.commands import add_client_commands

    add_client_commands(sub)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from meshlens.exporter.api.app import create_app
    from meshlens.exporter.api.server import ApiServer
    from meshlens.exporter.http_server import parse_addr
    from meshlens.exporter.prometheus.collector import ChainedCollector, MeshlensCollector

    err = None  # settings were validated by exporter/config.py before this runs
    try:
        identity = identity_from_args(args)  # started with the agent; its view names series
        token = args.settings.token()
    except (ValueError, OSError) as exc:
        err = str(exc)
    if err:
        print(f"meshlens: {err}", file=sys.stderr)
        return 2
    lock = InstanceLock(args.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 1
    cleanup_stale_pins()
    config = args.settings.agent_config()
    stop = threading.Event()
    install_stop_handlers(stop)
    agent = Agent(config, identity=args.settings.namespace_filter(identity.view), watch_status=identity.status)
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001 - one clear line, details in the log
        log.debug("start failed", exc_info=True)
        print(f"meshlens: cannot start: {exc}\nrun `meshlens check` for details", file=sys.stderr)
        lock.release()
        return 1
    try:
        identity.start()
        host, port = parse_addr(args.metrics_addr)
        collector = ChainedCollector([MeshlensCollector(agent.snapshot)])
        app = create_app(agent, collector, token)
        try:
            server = ApiServer(app, host, port).start()
        except OSError as exc:
            print(f"meshlens: cannot serve on {args.metrics_addr}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        observer = None
        if args.settings.grpc_listen:
            from meshlens.exporter.grpc.observer import serve_agent

            try:
                observer = serve_agent(agent, args.settings.node_name, args.settings.grpc_listen,
                                       args.settings.grpc_tls(), pods_only=args.settings.grpc_pods_only,
                                       queue_size=args.settings.grpc_queue_size)
            except (OSError, RuntimeError, ValueError) as exc:
                print(f"meshlens: cannot serve gRPC on {args.settings.grpc_listen}: {exc}", file=sys.stderr)
                server.shutdown()
                return 1
            from meshlens.exporter.grpc.observer_metrics import ObserverCollector

            collector.add(ObserverCollector(observer.feed))
            log.info("meshlens gRPC Observer on %s (node %s, TLS %s)", args.settings.grpc_listen,
                     args.settings.node_name, "on" if args.settings.grpc_tls() else "off")
        log.info("meshlens running: metrics on http://%s/metrics, API on http://%s/api/v1 (auth %s)",
                 args.metrics_addr, args.metrics_addr, "on" if token else "off")
        agent.run(stop)
        if observer is not None:
            observer.stop()
        server.shutdown()
    finally:
        identity.stop()
        agent.stop()
        lock.release()
        log.info("meshlens stopped: all programs detached")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from meshlens.exporter.grpc.observer import GrpcServer
    from meshlens.exporter.grpc.relay import Relay, RelayConfig
    from meshlens.exporter.grpc.relay_metrics import serve_metrics
    from meshlens.exporter.http_server import parse_addr

    try:
        s = relay_settings(args)
        tls = s.client_tls()
        if tls is not None:
            tls.credentials()               # unreadable files: one clear line now, not per reconnect
    except (ConfigError, ValueError) as exc:
        print(f"meshlens: {exc}", file=sys.stderr)
        return 2
    config = RelayConfig(agents=tuple(a for a in s.agents.split(",") if a), sort_window_s=s.sort_window,
                         max_buffered=s.max_buffered, queue_size=s.queue_size, tls=tls)
    stop = threading.Event()
    install_stop_handlers(stop)
    relay = Relay(config)
    try:
        server = GrpcServer(relay.servicer, s.listen, s.server_tls()).start()
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"meshlens: cannot serve gRPC on {s.listen}: {exc}", file=sys.stderr)
        return 1
    try:
        host, port = parse_addr(s.metrics_addr)
        metrics, _ = serve_metrics(relay, host, port)
    except OSError as exc:
        server.stop()
        print(f"meshlens: cannot serve metrics on {s.metrics_addr}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    relay.start(server.loop)        # one event loop for the agents' streams and the clients'
    watcher = None
    if s.agents_service:
        from meshlens.exporter.grpc.discovery import service_agents

        agents = service_agents(s.agents_service, s.kubeconfig)
        watcher = threading.Thread(target=agents.run, args=(relay.sync, stop), name="relay-discovery", daemon=True)
        watcher.start()
    log.info("meshlens relay on %s (metrics on http://%s/metrics), following %s", s.listen, s.metrics_addr,
             s.agents or f"the endpoints of {s.agents_service}")
    while not stop.wait(1.0):
        pass
    relay.stop()
    server.stop()
    metrics.shutdown()  # type: ignore[attr-defined]
    log.info("meshlens relay stopped")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from meshlens.agent.check import run_check

    try:
        features = tuple(Settings(features=args.features).features.split(","))
    except ValidationError as exc:
        print(f"meshlens: features: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    return run_check(sys.stdout, lambda kf: default_sources(AgentConfig(features=features), kf), features=features)


def cmd_config(_args: argparse.Namespace) -> int:
    sys.stdout.write(print_defaults())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "run":
        try:
            args = resolve_run_args(parser, args, argv)  # file < environment < flags
        except ConfigError as exc:
            print(f"meshlens: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("meshlens.libbpf").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)   # it logs every request line at INFO
    if args.cmd in ("run", "check", "config", "relay"):
        return {"run": cmd_run, "check": cmd_check, "config": cmd_config, "relay": cmd_relay}[args.cmd](args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
