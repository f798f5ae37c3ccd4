"""Helpers for the L7 integration tests: an in-process HttpSource shared by a test module,
views of its snapshot filtered to one pod (other tests and developers run traffic on this
machine concurrently), and client programs run inside pods."""
from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Tuple

from meshlens.agent.sources.l7.dns import DnsSnapshot
from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSource, HttpStats
from meshlens.agent.sources.l7.structs import DURATION_BOUNDS_S, kernel_bucket
from meshlens.agent.sources.l7.routes import template
from tests.integration.pods import Pod

Key = Tuple[str, int, str]  # (method, status, route)


def settle(src: HttpSource, seconds: float = 0.3) -> None:
    """After traffic stopped: wait, then until the agent's loop has swept twice more (the
    ring buffer is drained before each sweep)."""
    time.sleep(seconds)
    agent = src.test_agent  # type: ignore[attr-defined]
    target = agent.sweeps + 2
    assert wait_for(lambda: agent.sweeps >= target, timeout=10), "agent loop stalled"


def series_for(src: HttpSource, pod: Pod, role: str, port: int = 0) -> Dict[HttpSeriesKey, HttpStats]:
    out = {}
    for k, st in src.snapshot().series.items():
        # packet-path series name no process: cgroup 0, the pod is its netns
        if k.cgroup_id in (pod.cgroup_id, 0) and k.netns == pod.netns_inode and k.role == role:
            if port and k.server_port != port:
                continue
            out[k] = st
    return out


def counts_by_request(series: Dict[HttpSeriesKey, HttpStats]) -> Dict[Key, int]:
    out: Dict[Key, int] = collections.Counter()
    for k, st in series.items():
        out[(k.method, k.status, k.route)] += st.count
    return dict(out)


def diff_counts(after: Dict[Key, int], before: Dict[Key, int]) -> Dict[Key, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}


def log_counts(entries: List[dict], port: int = 80) -> Dict[Key, int]:
    out: Dict[Key, int] = collections.Counter()
    for e in entries:
        if e["server_port"] != port:
            continue
        out[(e["request_method"], int(e["status"]), template(e["request_uri"]))] += 1
    return dict(out)


def duration_buckets(series: Dict[HttpSeriesKey, HttpStats], pred: Callable[[HttpSeriesKey], bool]) -> List[int]:
    counts = [0] * (len(DURATION_BOUNDS_S) + 1)
    for k, st in series.items():
        if pred(k):
            counts = [a + b for a, b in zip(counts, st.duration.counts)]
    return counts


def expand(bucket_counts: List[int]) -> List[int]:
    """Bucket counts -> sorted list of bucket indexes, one per observation."""
    return [i for i, n in enumerate(bucket_counts) for _ in range(n)]


def request_time_buckets(entries: List[dict]) -> List[int]:
    return sorted(kernel_bucket(DURATION_BOUNDS_S, e["request_time"]) for e in entries)


def run_py(pod: Pod, script: str, *args: str, timeout: float = 60.0) -> str:
    return pod.run([sys.executable, "-c", script, *args], timeout=timeout).stdout


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def dns_series(snap: DnsSnapshot, pod: Pod) -> Dict:
    return {k: st for k, st in snap.series.items()
            if k.cgroup_id in (pod.cgroup_id, 0) and k.netns == pod.netns_inode}


L7_SOURCES = ("syscalls", "packets")


def started_source(l7_source: str = "syscalls", **kw) -> Iterator[HttpSource]:
    """The L7 sources run by the agent's own loop (runner.Agent) in a thread, as in
    `meshlens run`: ring buffers are polled continuously, maps swept every 0.1 s.
    l7_source: "syscalls" (l7.bpf.c), "packets" (l7pkt.bpf.c on the pod veths) or "auto" (both)."""
    from meshlens.agent.sources.l7.http import HttpConfig
    from meshlens.agent.sources.l7.select import l7_sources_for
    from meshlens.agent.runner import Agent, AgentConfig

    sources = l7_sources_for(l7_source, HttpConfig(**kw))
    agent = Agent(AgentConfig(sweep_interval_s=0.1, poll_timeout_ms=50), sources=sources)
    src = sources[0]
    src.test_agent = agent  # type: ignore[attr-defined]
    agent.start()
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,), name="l7-agent", daemon=True)
    loop.start()
    try:
        yield src  # type: ignore[misc]
    finally:
        stop.set()
        loop.join(timeout=10)
        agent.stop()
