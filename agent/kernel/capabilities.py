"""Which Linux capabilities the agent holds and which of them it needs, for `meshlens check`
and the DaemonSet's least-privilege set (daemonset/daemonset.yaml lists the same names).

Read from /proc/self/status (CapEff): a container started with `drop: [ALL]` and a few
`add:` entries has exactly those bits, whatever its uid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

# capability numbers from linux/capability.h
CAP_NUMBERS: Dict[str, int] = {"NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
                               "PERFMON": 38, "BPF": 39}
PID_NS_INIT_INO = 0xEFFFFFFC  # PROC_PID_INIT_INO: the inode of the initial pid namespace


@dataclass(frozen=True)
class Need:
    cap: str
    why: str
    features: Tuple[str, ...] = ()   # only needed when one of these runs; () = always


NEEDS: Tuple[Need, ...] = (
    Need("BPF", "bpf(): create maps, load programs and BTF, run iterators"),
    Need("PERFMON", "perf_event_open() for tracepoint programs; programs that read kernel memory"),
    Need("NET_ADMIN", "sched_cls programs and clsact qdiscs/tc filters on pod veths", ("tc",)),
    Need("SYS_PTRACE", "/proc/<pid>/ns/net and /proc/<pid>/fd of the node's processes "
                       "(netns -> pod identity; a crashed agent's tc filters told from a live one's)"),
    Need("SYS_ADMIN", "setns() into each pod's network namespace for the saturation socket walk", ("sat",)),
)


def effective(status_path: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise RuntimeError(f"no CapEff line in {status_path}")


def needed(features: Iterable[str]) -> List[Need]:
    on = set(features)
    return [n for n in NEEDS if not n.features or on & set(n.features)]


def missing(features: Iterable[str], cap_eff: int) -> List[Need]:
    """The needed capabilities not in `cap_eff`."""
    return [n for n in needed(features) if not cap_eff >> CAP_NUMBERS[n.cap] & 1]


def in_host_pid_namespace(ns_path: str = "/proc/self/ns/pid") -> bool:
    """True when /proc shows every process of the node (hostPID, or not in a container)."""
    try:
        return os.stat(ns_path).st_ino == PID_NS_INIT_INO
    except OSError:
        return False
