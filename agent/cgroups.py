"""cgroup v2 id -> cgroup path, for naming the local side of a flow without Kubernetes.

The kernel reports a socket's cgroup as its cgroup v2 id, which is the inode number of the
cgroup's directory in the cgroup2 mount. This module walks that mount lazily and caches the
mapping; unknown ids trigger at most one rescan per `rescan_interval` seconds.
Later, agent/identity turns these paths into pods (kubelet naming).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, Optional


def cgroup2_mount() -> Optional[str]:
    """Where cgroup v2 is mounted (/sys/fs/cgroup on unified hosts, .../unified on hybrid)."""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


class CgroupResolver:
    def __init__(
        self,
        root: Optional[str] = None,
        rescan_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._max = max_entries
        self._paths: Dict[int, str] = {}
        self._last_scan = float("-inf")
        self._lock = threading.Lock()
        self.scans = 0

    def path(self, cgroup_id: int) -> str:
        """Path relative to the cgroup2 root ("/" for the root), or "" if unknown."""
        if not cgroup_id or not self.root:
            return ""
        with self._lock:
            found = self._paths.get(cgroup_id)
            if found is None and self._clock() - self._last_scan >= self.rescan_interval:
                self._scan()
                found = self._paths.get(cgroup_id)
        return found or ""

    def _scan(self) -> None:
        self._last_scan = self._clock()
        self.scans += 1
        paths: Dict[int, str] = {}
        root = self.root
        assert root is not None
        for dirpath, dirnames, _ in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = dirpath[len(root):] or "/"
            paths[ino] = rel
            if len(paths) >= self._max:
                break
        self._paths = paths
