"""Visiting every network namespace on the node from one dedicated thread.

Used by agent/sources/saturation/source.py at each sweep: socket iterators and net sysctls
(`ip_local_port_range`, `nf_conntrack_count`) answer for the namespace of the thread that
opens them, so a single worker thread enters each namespace in turn (setns), runs the
visit, and moves on. Namespaces are found by agent/kernel/netns.NetnsDirectory (/proc/<pid>/ns/net and
/run/netns), so a namespace that holds no process but is pinned by `ip netns` is visited too.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Callable, Dict, Tuple, TypeVar

from meshlens.agent.kernel.netns import NetnsDirectory, setns_net

log = logging.getLogger("meshlens.saturation")

T = TypeVar("T")


class NetnsVisitor:
    """One worker thread that runs a function inside each network namespace in turn."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshlens-netns")
        self._namespaces = NetnsDirectory()  # /run/netns pins and every process's namespace
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.errors = 0  # namespaces that went away (or refused us) between listing and entering
        self.listed: frozenset = frozenset()  # every namespace the last visit found, entered or not

    def visit_all(self, fn: Callable[[int], T], timeout_s: float = 30.0) -> Dict[int, T]:
        """{netns inode: fn(inode)} for every namespace fn could run in."""
        return self.submit(fn).result(timeout_s)

    def submit(self, fn: Callable[[int], T]) -> "concurrent.futures.Future[Dict[int, T]]":
        """Start a visit of every namespace in the worker thread; the future holds visit_all's result."""
        return self._pool.submit(self._visit_all, fn)

    def _visit_all(self, fn: Callable[[int], T]) -> Dict[int, T]:
        out: Dict[int, T] = {}
        try:
            found = self._namespaces.scan()
            self.listed = frozenset(found)
            for inode, path in sorted(found.items()):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self.errors += 1
                    continue
                try:
                    setns_net(fd)
                    out[inode] = fn(inode)
                except OSError as exc:
                    self.errors += 1
                    log.debug("netns %d: %s", inode, exc)
                finally:
                    os.close(fd)
        finally:
            setns_net(self._home)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._home >= 0:
            os.close(self._home)
            self._home = -1


def read_sysctl_ints(path: str) -> Tuple[int, ...]:
    """Whitespace-separated integers of a /proc/sys file, () when it does not exist here."""
    try:
        with open(path) as f:
            return tuple(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return ()
