"""Runs the real agent (`meshlens run`) as a subprocess for integration tests and reads its
/metrics the way Prometheus would (text format, parsed by prometheus_client's parser).

Each AgentProcess has its own state dir (lock) and port, so tests can run next to other
agents on the same machine; every query filters by the test's own pods (netns inode).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.servers import free_port

MESHLENS = str(Path(sys.executable).with_name("meshlens"))

Labels = Dict[str, str]


@dataclass
class Sample:
    name: str
    labels: Labels
    value: float


class AgentProcess:
    def __init__(self, *extra_args: str, sweep_interval: float = 0.2, env: Optional[Dict[str, str]] = None) -> None:
        self.env = {**os.environ, **env} if env else None  # extra environment for the agent only
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.state_dir = tempfile.mkdtemp(prefix="meshlens-test-")
        self.log_path = os.path.join(self.state_dir, "agent.log")
        self.args = [MESHLENS, "run", "--metrics-addr", self.addr, "--state-dir", self.state_dir,
                     "--sweep-interval", str(sweep_interval), *extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self.exit_code: Optional[int] = None

    def start(self, timeout: float = 20.0) -> "AgentProcess":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # reap the process, close the log, remove the state dir
            raise

    def _start(self, timeout: float) -> "AgentProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.scrape_text()
                return self
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # serving, behind a bearer token
                    return self
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"agent did not serve /metrics in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def scrape_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=5) as r:
            return r.read().decode()

    def samples(self) -> List[Sample]:
        out = []
        for fam in text_string_to_metric_families(self.scrape_text()):
            for s in fam.samples:
                out.append(Sample(s.name, dict(s.labels), s.value))
        return out

    def total(self, name: str, **match: str) -> float:
        """Sum of samples called `name` whose labels include `match`."""
        return sum(s.value for s in self.samples() if s.name == name
                   and all(s.labels.get(k) == v for k, v in match.items()))

    def wait_total(self, name: str, expected: float, timeout: float = 15.0, **match: str) -> float:
        """Poll until total(name, **match) == expected (or timeout); returns the last value."""
        deadline = time.monotonic() + timeout
        value = self.total(name, **match)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            value = self.total(name, **match)
        return value

    def usage(self) -> Tuple[float, int]:
        """(CPU seconds used so far, RSS bytes) of the agent process."""
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        t = p.cpu_times()
        return t.user + t.system, p.memory_info().rss

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:  # never started (or already stopped): only the directory to remove
            shutil.rmtree(self.state_dir, ignore_errors=True)
            return self.exit_code or 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        self._log.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.proc = None
        return self.exit_code

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def held_prog_ids(pid: int) -> Dict[int, str]:
    """BPF programs a process holds (through program or link fds): id -> name. Read from
    /proc/<pid>/fdinfo, so it is exact even when other agents run on the same machine."""
    ids = set()
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    for info in fd_dir.iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    names = {pid_: name for pid_, name in loaded_programs().items() if pid_ in ids}
    return names


def loaded_programs() -> Dict[int, str]:
    """Every BPF program loaded in the kernel: id -> name."""
    import json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: p.get("name", "") for p in json.loads(out or "[]")}


def our_bpf_programs() -> List[str]:
    """Names of loaded BPF programs that belong to meshlens (bpftool's view of the kernel)."""
    import json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    ours = ("handle_", "fexit_tcp_", "fentry_tcp_", "probe_fentry")
    return [p.get("name", "") for p in json.loads(out or "[]") if p.get("name", "").startswith(ours)]
