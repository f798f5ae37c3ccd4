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
    """Resolves ids on demand. A never-seen id triggers a rescan at once (new pods resolve on
    their first connection, so a series never starts with an empty cgroup label and then
    changes); ids still unknown after a scan are remembered as such for `negative_ttl`
    seconds, and scans are at least `min_scan_interval` apart, so a stream of dead ids cannot
    turn into a stream of tree walks. Paths of deleted cgroups stay cached."""

    def __init__(
        self,
        root: Optional[str] = None,
        min_scan_interval: float = 0.05,
        negative_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.min_scan_interval = min_scan_interval
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._max = max_entries
        self._paths: Dict[int, str] = {}
        self._unknown: Dict[int, float] = {}
        self._last_scan = float("-inf")
        self._lock = threading.Lock()
        self.scans = 0

    def path(self, cgroup_id: int) -> str:
        """Path relative to the cgroup2 root ("/" for the root), or "" if unknown."""
        if not cgroup_id or not self.root:
            return ""
        with self._lock:
            found = self._paths.get(cgroup_id)
            if found is not None:
                return found
            now = self._clock()
            if now - self._unknown.get(cgroup_id, float("-inf")) < self.negative_ttl:
                return ""
            if now - self._last_scan >= self.min_scan_interval:
                self._scan()
            found = self._paths.get(cgroup_id)
            if found is None:
                self._unknown[cgroup_id] = now
                if len(self._unknown) > self._max:
                    self._unknown.clear()
            return found or ""

    def _scan(self) -> None:
        self._last_scan = self._clock()
        self.scans += 1
        root = self.root
        assert root is not None
        for dirpath, _dirnames, _ in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            self._paths[ino] = dirpath[len(root):] or "/"
            self._unknown.pop(ino, None)
        if len(self._paths) > self._max:  # keep the newest scan's view only
            self._paths = dict(list(self._paths.items())[-self._max:])
