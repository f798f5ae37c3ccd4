"""`meshlens` command line: `run` starts the agent (standalone on this node), `check`
reports whether this kernel can run it. The console-script entry point of the package."""
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
from meshlens.agent.sources.saturation.source import SatConfig
from meshlens.agent.sources.tcp.source import TcpConfig

log = logging.getLogger("meshlens")

EPILOG = """examples:
  meshlens check                                 # can this node run the agent?
  meshlens run --metrics-addr 127.0.0.1:9433     # standalone agent, Prometheus on :9433
  curl -s 127.0.0.1:9433/metrics | grep meshlens_tcp_
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshlens", description="Sidecarless eBPF telemetry agent.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent on this node")
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
    sub.add_parser("check", help="check that this kernel can run the agent")
    return p


def _positive(args: argparse.Namespace) -> Optional[str]:
    for name in ("sweep_interval", "socket_walk_interval", "max_flows", "flow_ttl", "conns_map_size", "rollups_map_size",
                 "map_window", "map_interval"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive"
    return None


def _features_error(value: str) -> Optional[str]:
    from meshlens.agent.runner import FEATURES

    unknown = {f.strip() for f in value.split(",") if f.strip()} - set(FEATURES)
    return f"--features: unknown {', '.join(sorted(unknown))} (choose from {', '.join(FEATURES)})" if unknown else None


def cmd_run(args: argparse.Namespace) -> int:
    from meshlens.exporter.prometheus.collector import MeshlensCollector
    from meshlens.exporter.http_server import serve_metrics

    from meshlens.exporter.http_server import parse_addr

    err = _positive(args)
    if err is None:
        err = _features_error(args.features)
    if err is None:
        try:
            parse_addr(args.metrics_addr)  # refuse bad input before touching the kernel
        except ValueError as exc:
            err = str(exc)
    if err is None:
        try:
            identity = identity_from_args(args)  # started with the agent; its view names series
        except ValueError as exc:
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
    config = AgentConfig(
        sweep_interval_s=args.sweep_interval,
        map_window_s=args.map_window,
        features=tuple(sorted({"l4", *(f.strip() for f in args.features.split(",") if f.strip())})),
        map_interval_s=args.map_interval,
        l7_source=args.l7_source,
        tcp=TcpConfig(conns_max_entries=args.conns_map_size, rollups_max_entries=args.rollups_map_size,
                      max_rollups=args.max_flows, rollup_ttl_s=args.flow_ttl),
        sat=SatConfig(walk_interval_s=args.socket_walk_interval),
    )
    stop = threading.Event()
    install_stop_handlers(stop)
    agent = Agent(config, identity=identity.view, watch_status=identity.status)
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001 - one clear line, details in the log
        log.debug("start failed", exc_info=True)
        print(f"meshlens: cannot start: {exc}\nrun `meshlens check` for details", file=sys.stderr)
        lock.release()
        return 1
    try:
        identity.start()
        server, _ = serve_metrics(MeshlensCollector(agent.snapshot), args.metrics_addr)
        log.info("meshlens running: metrics on http://%s/metrics", args.metrics_addr)
        agent.run(stop)
        server.shutdown()
    finally:
        identity.stop()
        agent.stop()
        lock.release()
        log.info("meshlens stopped: all programs detached")
    return 0


def cmd_check(_args: argparse.Namespace) -> int:
    from meshlens.agent.check import run_check

    return run_check(sys.stdout, lambda kf: default_sources(AgentConfig(), kf))


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("meshlens.libbpf").setLevel(logging.WARNING)
    return {"run": cmd_run, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
