"""Visiting every network namespace on the node from one dedicated thread.

Used by agent/sources/saturation/source.py at each sweep: socket iterators and net sysctls
(`ip_local_port_range`, `nf_conntrack_count`) answer for the namespace of the thread that
opens them, so a single worker thread enters each namespace in turn (setns), runs the
visit, and moves on. Namespaces are found through /proc/<pid>/ns/net and /run/netns, so a
namespace that holds no process but is pinned by `ip netns` is visited too.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
from typing import Callable, Dict, Tuple, TypeVar

log = logging.getLogger("meshlens.saturation")

CLONE_NEWNET = 0x40000000
PINNED_DIRS = ("/run/netns", "/var/run/netns")
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def network_namespaces(proc: str = "/proc") -> Dict[int, str]:
    """{netns inode: a path that opens it}, one path per namespace."""
    found: Dict[int, str] = {}
    for d in PINNED_DIRS:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                found.setdefault(os.stat(path).st_ino, path)
            except OSError:
                continue
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        path = f"{proc}/{pid}/ns/net"
        try:
            found.setdefault(os.stat(path).st_ino, path)
        except OSError:
            continue  # the process exited, or is not ours to look at
    return found


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsVisitor:
    """One worker thread that runs a function inside each network namespace in turn."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshlens-netns")
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
            found = network_namespaces()
            self.listed = frozenset(found)
            for inode, path in sorted(found.items()):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self.errors += 1
                    continue
                try:
                    _setns(fd)
                    out[inode] = fn(inode)
                except OSError as exc:
                    self.errors += 1
                    log.debug("netns %d: %s", inode, exc)
                finally:
                    os.close(fd)
        finally:
            _setns(self._home)
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
