"""Network namespaces of this node, and running a kernel call inside one.

Used by agent/sources/tcp/source.py and agent/sources/saturation/netns.py: a `bpf_iter/tcp` iterator shows only the sockets of the
namespace its reader is in, so each sweep reads the iterator once per namespace. Namespaces
are found from /proc/<pid>/ns/net (cached per pid) and the bind mounts in /run/netns; no
file descriptor is kept between sweeps, so the agent never keeps a deleted namespace alive.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from meshlens.agent.kernel.libbpf import get_errno, libc

CLONE_NEWNET = 0x40000000
NETNS_DIRS = ("/run/netns", "/var/run/netns")

T = TypeVar("T")


def _inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class NetnsDirectory:
    """Every network namespace with a process or a bind mount: inode -> a path to open it."""

    def __init__(self, proc: str = "/proc", netns_dirs: Tuple[str, ...] = NETNS_DIRS) -> None:
        self.proc = proc
        self.netns_dirs = netns_dirs
        self._pid_ns: Dict[int, int] = {}
        self.own = _inode(f"{proc}/thread-self/ns/net") or _inode(f"{proc}/self/ns/net") or 0

    def scan(self) -> Dict[int, str]:
        """inode -> path, refreshed: new pids are looked up once, gone pids forgotten."""
        found: Dict[int, str] = {}
        for d in self.netns_dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                path = os.path.join(d, n)
                ino = _inode(path)
                if ino and ino not in found:
                    found[ino] = path
        pids = {int(p) for p in os.listdir(self.proc) if p.isdigit()}
        for gone in set(self._pid_ns) - pids:
            del self._pid_ns[gone]
        for pid in pids:
            ino = self._pid_ns.get(pid)
            if ino is None:
                ino = _inode(f"{self.proc}/{pid}/ns/net")
                if ino is None:
                    continue
                self._pid_ns[pid] = ino
            if ino not in found:
                found[ino] = f"{self.proc}/{pid}/ns/net"
        return found


def setns_net(fd: int) -> None:
    """Move this thread into the network namespace open at `fd`."""
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body in the network namespace at `path` (this thread only), then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            setns_net(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns_net(home)
    finally:
        os.close(home)


def in_each(namespaces: Dict[int, str], own: int, fn: Callable[[], T]) -> Tuple[List[T], int]:
    """fn() once in the agent's own namespace and once in every other one; returns the results
    and how many namespaces could not be entered (gone since the scan)."""
    results = [fn()]
    missed = 0
    for ino, path in namespaces.items():
        if ino == own:
            continue
        try:
            with entered(path):
                results.append(fn())
        except OSError:
            missed += 1
    return results, missed
