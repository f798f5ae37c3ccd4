"""Entry point: `python -m bench.run [--quick] [--only SECTION ...]`.

Runs the sections in order (overhead, l4, agent_cost, capacity, accuracy, exporter), each on
its own so that one failing section still leaves a report of the others, and writes
bench/report.md and bench/report.json. Needs root (netns, cgroups, BPF); the exporter
section alone does not. Everything created is removed at the end, also on Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from . import closing as closing_notes
from .context import Context
from .env import environment
from .report import SectionResult, write_reports

SECTIONS = ("overhead", "l4", "agent_cost", "capacity", "accuracy", "exporter", "api")
HERE = Path(__file__).resolve().parent
NEEDS_ROOT = {"overhead", "l4", "agent_cost", "capacity", "accuracy"}  # exporter and api run without

log = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~2 min): a smoke check")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--out", type=Path, default=HERE, help="directory for report.md and report.json")
    return p


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: agents, pods, sysctl


def run_section(name: str, ctx: Context) -> SectionResult:
    module = importlib.import_module(f"bench.{name}")
    t0 = time.monotonic()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    try:
        result: SectionResult = module.run(ctx)
    except Exception as exc:  # noqa: BLE001 - report the failure, keep the other sections
        traceback.print_exc()
        result = SectionResult(name, name, error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - t0
    print(f"bench: {name} done in {result.seconds:.0f} s", file=sys.stderr, flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [s for s in SECTIONS if not args.only or s in args.only]
    if os.geteuid() != 0 and NEEDS_ROOT & set(names):
        print("bench: sections other than `exporter` need root (netns, cgroups, BPF)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    t0 = time.monotonic()
    env = environment()
    ctx = Context(quick=args.quick)
    if NEEDS_ROOT & set(names):
        from .agentrun import default_source_names

        ctx.default_sources = default_source_names()
    results: List[SectionResult] = []
    try:
        for name in names:
            results.append(run_section(name, ctx))
    finally:
        ctx.close()
        from tests.integration.pods import cleanup_leftovers

        left = cleanup_leftovers()
        if left:
            print(f"bench: cleaned up leftovers: {left}", file=sys.stderr)
    env.update(quick=args.quick, sections=names, default_sources=ctx.default_sources, attached=ctx.attach,
               total_seconds=time.monotonic() - t0, warnings=ctx.warnings, notes=ctx.notes)
    args.out.mkdir(parents=True, exist_ok=True)
    closing = closing_notes.notes(results, ctx) + [f"note: {n}" for n in ctx.notes]
    write_reports(results, env, closing, args.out / "report.md", args.out / "report.json")
    print(f"bench: wrote {args.out / 'report.md'} and {args.out / 'report.json'} "
          f"in {env['total_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
