"""Network namespace inode -> what lives in it: a process's cgroup path and the addresses.

Place in the data flow: the fallback of agent/identity/resolver.py when a socket's cgroup does not
name a pod (cgroup id 0, a non-kubepods cgroup): every process of a pod shares the pod's
netns, so any process found in that netns (the pause container at least) has a cgroup that
does; failing that, the netns's own interface addresses are pod IPs the watch knows.

Sources, both read from the host's view (the DaemonSet needs hostPID and /var/run/netns):
- /proc/<pid>/ns/net of every process: gives a pid, hence /proc/<pid>/cgroup and the
  netns's addresses from /proc/<pid>/net/fib_trie and /proc/<pid>/net/if_inet6;
- /var/run/netns/* (where CNI plugins and `ip netns` bind-mount pod namespaces): a netns
  with no process left; its addresses are read by a short-lived thread that joins it.
Results are cached; a never-seen inode triggers a scan at once, unknown ones are retried no
sooner than `negative_ttl`, and scans are at least `min_scan_interval` apart.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

log = logging.getLogger("meshlens.netns")

CLONE_NEWNET = 0x40000000
NAMED_NETNS_DIRS = ("/var/run/netns", "/run/netns")


@dataclass(frozen=True)
class NetnsInfo:
    cgroup_path: str                 # of a process in the netns ("" if none found)
    addresses: Tuple[str, ...]       # global addresses of its interfaces


def _ns_inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def read_cgroup_path(pid: int, proc: str = "/proc") -> str:
    """The cgroup v2 path of a process ("0::/path" line of /proc/<pid>/cgroup)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return ""


def parse_fib_trie_local(text: str) -> List[str]:
    """Local IPv4 addresses from /proc/net/fib_trie: the address line before '/32 host LOCAL'."""
    out: List[str] = []
    last = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip().split()[0]
        elif stripped.startswith("+--"):
            last = ""
        elif "/32 host LOCAL" in stripped and last and last not in out:
            out.append(last)
    return [a for a in out if not ipaddress.ip_address(a).is_loopback]


def parse_if_inet6(text: str) -> List[str]:
    """Global IPv6 addresses from /proc/net/if_inet6 (32 hex digits per line)."""
    out: List[str] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if not (addr.is_loopback or addr.is_link_local):
            out.append(str(addr))
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def addresses_of_pid(pid: int, proc: str = "/proc") -> Tuple[str, ...]:
    v4 = parse_fib_trie_local(_read(f"{proc}/{pid}/net/fib_trie"))
    v6 = parse_if_inet6(_read(f"{proc}/{pid}/net/if_inet6"))
    return tuple(v4 + v6)


def addresses_of_netns_file(path: str) -> Tuple[str, ...]:
    """Addresses of a named netns, read by a thread that joins it (netns is per thread)."""
    result: Dict[str, Tuple[str, ...]] = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    return
            finally:
                os.close(fd)
            v4 = parse_fib_trie_local(_read("/proc/thread-self/net/fib_trie"))
            v6 = parse_if_inet6(_read("/proc/thread-self/net/if_inet6"))
            result["a"] = tuple(v4 + v6)
        except OSError as exc:
            log.debug("cannot enter netns %s: %s", path, exc)

    t = threading.Thread(target=body, name="netns-addr", daemon=True)
    t.start()
    t.join(5)
    return result.get("a", ())


class NetnsLocator:
    """netns inode -> NetnsInfo, by scanning /proc and the named-netns directories."""

    def __init__(self, proc: str = "/proc", named_dirs: Tuple[str, ...] = NAMED_NETNS_DIRS,
                 min_scan_interval: float = 0.5, negative_ttl: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.proc = proc
        self.named_dirs = named_dirs
        self.min_scan_interval = min_scan_interval
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._cache: Dict[int, NetnsInfo] = {}
        self._unknown: Dict[int, float] = {}
        self._last_scan = float("-inf")
        self._pids: Dict[int, int] = {}     # netns inode -> a pid in it (last scan)
        self._named: Dict[int, str] = {}    # netns inode -> bind-mounted netns file (last scan)
        self.host_netns = _ns_inode(f"{proc}/1/ns/net")
        self.scans = 0

    def lookup(self, netns: int) -> Optional[NetnsInfo]:
        """What is in netns `netns`; None if unknown or the host's own namespace."""
        if not netns or netns == self.host_netns:
            return None
        with self._lock:
            found = self._cache.get(netns)
            if found is not None:
                return found
            now = self._clock()
            if now - self._unknown.get(netns, float("-inf")) < self.negative_ttl:
                return None
            if netns not in self._pids and netns not in self._named:
                if now - self._last_scan < self.min_scan_interval:
                    return None  # rate-limited: not known yet, not known to be absent either
                self._scan()
            found = self._describe(netns)
            if found is None:
                self._unknown[netns] = now
                if len(self._unknown) > self._max:
                    self._unknown.clear()
                return None
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[netns] = found
            return found

    def _scan(self) -> None:
        """One pass over /proc/*/ns/net and the named-netns directories."""
        self._last_scan = self._clock()
        self.scans += 1
        pids: Dict[int, int] = {}
        try:
            entries = os.listdir(self.proc)
        except OSError:
            entries = []
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                link = os.readlink(f"{self.proc}/{entry}/ns/net")
            except OSError:
                continue
            if link.startswith("net:[") and link.endswith("]"):
                pids.setdefault(int(link[5:-1]), int(entry))
        named: Dict[int, str] = {}
        for d in self.named_dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                path = os.path.join(d, name)
                ino = _ns_inode(path)
                if ino:
                    named.setdefault(ino, path)
        self._pids, self._named = pids, named

    def _describe(self, netns: int) -> Optional[NetnsInfo]:
        pid = self._pids.get(netns)
        if pid:
            path = read_cgroup_path(pid, self.proc)
            if path or os.path.exists(f"{self.proc}/{pid}"):
                return NetnsInfo(path, addresses_of_pid(pid, self.proc))
        path = self._named.get(netns)
        if path:
            return NetnsInfo("", addresses_of_netns_file(path))
        return None

    def forget(self, netns: int) -> None:
        """Drop a cached answer (a netns inode can be reused after its namespace is gone)."""
        with self._lock:
            self._cache.pop(netns, None)
