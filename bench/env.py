"""What else ran on the machine: the bench shares its 2 cores with whatever else is going
on (other test sessions, other agents). Every round records how busy the machine was and
which foreign BPF programs were loaded, so a noisy round can be told from a real effect."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List

import psutil


def foreign_bpf_programs(own_pids: Iterable[int] = ()) -> Dict[str, int]:
    """Loaded tracing/tc/cgroup BPF programs not held by `own_pids`, counted by type."""
    own_ids = set()
    for pid in own_pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            own_ids.add(int(line.split(":", 1)[1]))
        except OSError:
            continue
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=False).stdout
    counts: Dict[str, int] = {}
    try:
        progs = json.loads(out or "[]")
    except ValueError:
        return counts
    for p in progs:
        kind = str(p.get("type", "?"))
        if int(p.get("id", -1)) in own_ids or kind in ("cgroup_device", "cgroup_skb") and not p.get("name"):
            continue
        if kind in ("tracepoint", "kprobe", "tracing", "sched_cls", "cgroup_skb", "raw_tracepoint", "perf_event"):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def other_agents(own_pids: Iterable[int] = ()) -> int:
    """Other `meshlens run` processes on the machine (their programs see our traffic too)."""
    own = set(own_pids)
    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if p.info["pid"] not in own and "meshlens run" in cmd:
            n += 1
    return n


@dataclass
class BusyMeter:
    """System-wide CPU busy (cores) over an interval, from /proc/stat via psutil."""

    def __post_init__(self) -> None:
        self._t0 = psutil.cpu_times()
        self._w0 = time.monotonic()

    def cores(self) -> float:
        t1, w1 = psutil.cpu_times(), time.monotonic()
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)  # noqa: E731
        return (busy(t1) - busy(self._t0)) / max(1e-9, w1 - self._w0)


def round_context(own_pids: Iterable[int] = ()) -> Dict[str, Any]:
    """Snapshot of the machine's other activity, stored with each round."""
    own = list(own_pids)
    return {"loadavg1": os.getloadavg()[0], "foreign_bpf": foreign_bpf_programs(own),
            "other_agents": other_agents(own)}


def environment() -> Dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "commit": commit,
        "python": platform.python_version(),
        "tools": {t: _version(t) for t in ("nginx", "wrk", "iperf3")},
        "loadavg_start": os.getloadavg(),
        "foreign_bpf_start": foreign_bpf_programs(),
        "other_agents_start": other_agents(),
    }


def _version(tool: str) -> str:
    flag = {"nginx": "-v", "wrk": "-v", "iperf3": "--version"}[tool]
    r = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0] if text else "?"


def busy_warnings(rounds: List[Dict[str, Any]]) -> List[str]:
    """Human-readable caveats when rounds ran next to foreign load or foreign BPF programs."""
    out = []
    foreign = [sum(r.get("foreign_bpf", {}).values()) for r in rounds if "foreign_bpf" in r]
    agents = [r.get("other_agents", 0) for r in rounds]
    if foreign and max(foreign) > 0:
        out.append(f"{sum(1 for f in foreign if f)} of {len(foreign)} rounds ran while other BPF programs "
                   f"were loaded on the machine (up to {max(foreign)}; e.g. other sessions' agents): "
                   "baselines are not clean kernels.")
    if agents and max(agents) > 0:
        out.append(f"other meshlens agents were running during {sum(1 for a in agents if a)} of {len(agents)} rounds.")
    return out
