"""The agent under test: start it in a mode, read what it attached, its CPU/RSS, and the
kernel-side run time of its own BPF programs.

Modes: "l4" runs `meshlens run --features l4` (TCP only); "full" runs `meshlens run` exactly
as shipped (whatever `default_sources()` returns: L7 with `--l7-source auto`); "packets" runs
`meshlens run --l7-source packets` (L7 from packets at the pod veths only, no syscall tracepoints).
Kernel cost is read from /proc/<agent>/fdinfo of the agent's BPF program fds (prog_id,
run_time_ns, run_cnt), so programs of other agents on the machine are never mixed in.
Run-time stats are switched on with BPF_ENABLE_STATS (an fd) rather than the
kernel.bpf_stats_enabled sysctl: other sessions on the same machine toggle the sysctl, and
the fd keeps stats on regardless and leaves no global setting behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

from tests.integration.agent_proc import AgentProcess

def default_source_names() -> List[str]:
    """Names of the sources `meshlens run` would start on this kernel (nothing is loaded)."""
    from meshlens.agent.kernel.features import KernelFeatures
    from meshlens.agent.runner import AgentConfig, default_sources

    return [s.name for s in default_sources(AgentConfig(), KernelFeatures.probe())]


MODE_ARGS = {"l4": ("--features", "l4"), "l4_tp": ("--features", "l4"), "full": (), "packets": ("--l7-source", "packets")}
# l4_tp: L4 with the state program on the classic tracepoint instead of tp_btf (A/B of the attach point)
MODE_ENV = {"l4_tp": {"MESHLENS_ATTACH_SKIP": "tcp_state/tp_btf"}}


class BenchAgent(AgentProcess):
    """AgentProcess in a bench mode; remembers what it attached."""

    def __init__(self, mode: str, *extra_args: str, sweep_interval: float = 1.0) -> None:
        if mode not in MODE_ARGS:
            raise ValueError(f"unknown agent mode {mode!r}")
        super().__init__(*MODE_ARGS[mode], *extra_args, sweep_interval=sweep_interval, env=MODE_ENV.get(mode))
        self.mode = mode
        self.attached: List[str] = []

    def start(self, timeout: float = 30.0) -> "BenchAgent":
        try:
            super().start(timeout)
            self.attached = attach_summary(self)
        except BaseException:
            self.stop()  # reaps the process, closes the log, removes the state dir
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def lost_events(self) -> float:
        return self.total("meshlens_agent_events_lost_total")


def attach_summary(agent: AgentProcess) -> List[str]:
    """'source/signal=variant' for every signal the agent attached (attach_info == 1)."""
    return sorted(f"{s.labels.get('source')}/{s.labels.get('signal')}={s.labels.get('variant')}"
                  for s in agent.samples() if s.name == "meshlens_agent_attach_info" and s.value == 1)


@dataclass(frozen=True)
class ProgStats:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int


def _fdinfo_progs(pid: int) -> Dict[int, Dict[str, int]]:
    out: Dict[int, Dict[str, int]] = {}
    fddir = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fddir):
        try:
            with open(os.path.join(fddir, fd)) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if "prog_id" not in fields or "run_time_ns" not in fields or "link_id" in fields:
            continue  # not a program fd (link fds name their program too)
        pid_ = int(fields["prog_id"])
        out[pid_] = {k: int(fields[k]) for k in ("run_time_ns", "run_cnt") if k in fields}
    return out


def _prog_names() -> Dict[int, str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=False).stdout
    try:
        return {int(p["id"]): str(p.get("name", "")) for p in json.loads(out or "[]")}
    except (ValueError, KeyError):
        return {}


def prog_stats(pid: int) -> Dict[int, ProgStats]:
    """Run time and count of every BPF program the process `pid` holds an fd to."""
    names = _prog_names()
    return {i: ProgStats(i, names.get(i, f"prog{i}"), v.get("run_time_ns", 0), v.get("run_cnt", 0))
            for i, v in _fdinfo_progs(pid).items()}


def prog_delta(before: Dict[int, ProgStats], after: Dict[int, ProgStats]) -> Dict[str, Dict[str, int]]:
    """Per program name: run_time_ns and run_cnt accumulated between two readings."""
    out: Dict[str, Dict[str, int]] = {}
    for i, a in after.items():
        b = before.get(i, ProgStats(i, a.name, 0, 0))
        d = out.setdefault(a.name, {"run_time_ns": 0, "run_cnt": 0})
        d["run_time_ns"] += a.run_time_ns - b.run_time_ns
        d["run_cnt"] += a.run_cnt - b.run_cnt
    return out


def program_objects() -> Dict[str, str]:
    """Program name (as the kernel shows it, 15 chars) -> BPF object it comes from
    (tcpconn, l7, ...), from the FUNC entries of each shipped object's BTF."""
    from meshlens.agent.kernel import bpf as agent_bpf

    objdir = Path(agent_bpf.object_path("tcpconn")).parent
    out: Dict[str, str] = {}
    for obj in sorted(objdir.glob("*.bpf.o")):
        r = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)], capture_output=True, text=True,
                           check=False)
        try:
            types = json.loads(r.stdout or "{}").get("types", [])
        except ValueError:
            continue
        for t in types:
            if t.get("kind") == "FUNC":  # bpftool shows the BTF name, the kernel keeps 15 chars
                name, stem = str(t["name"]), obj.name.split(".")[0]
                out[name] = out[name[:15]] = stem
    return out


BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
NR_BPF = {"x86_64": 321, "aarch64": 280}


def _enable_stats_fd() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run-time stats stay on while the returned fd is
    open, whatever anyone writes to kernel.bpf_stats_enabled meanwhile (the kernel counts
    the fd and the sysctl separately), and they go off by themselves if this process dies."""
    import ctypes
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 8)()  # union bpf_attr { struct { __u32 type; } enable_stats; }
    fd = libc.syscall(NR_BPF[platform.machine()], BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    return int(fd)


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """BPF run-time statistics on for the block (see _enable_stats_fd); nothing to restore."""
    fd = _enable_stats_fd()
    try:
        yield
    finally:
        os.close(fd)
