"""Discovers the interfaces the tc programs belong on and follows them as they come and go.

A netlink socket bound to RTMGRP_LINK (pyroute2) is read in a thread; on start it is bound
first and the links are dumped after, so nothing created in between is missed. A link is a
pod's host-side veth when it is a veth whose peer lives in another network namespace
(IFLA_LINK_NETNSID present): that is what every CNI's pod plumbing looks like, whatever
the naming (cali*, lxc*, veth*). Optionally the node's main interface is watched by name.
The callbacks run in the watcher thread as soon as the message arrives, so attaching takes
milliseconds after a link appears, not a sweep interval.

Also resolves IFLA_LINK_NETNSID (an id local to our netns) to the peer namespace's inode,
which the identity layer maps to a pod: ids are looked up with RTM_GETNSID on each netns
file under /var/run/netns and /proc/<pid>/ns/net, cached, and re-checked on every use
(ids are reused after a namespace dies).

Upstream: the kernel's link notifications. Downstream: agent/sources/tc/source.py (attach, forget).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("meshlens.links")

KIND_POD_VETH = "pod_veth"
KIND_MAIN = "main"


@dataclass(frozen=True)
class LinkInfo:
    ifindex: int
    name: str
    kind: str                   # pod_veth | main
    peer_ifindex: int = 0       # IFLA_LINK: the veth peer's ifindex in its own netns
    peer_netnsid: int = -1      # IFLA_LINK_NETNSID (-1: same netns or not a veth)


def classify(msg, main_interface: Optional[str] = None) -> Optional[LinkInfo]:
    """LinkInfo for a RTM_NEWLINK message of a link we want, else None (pure: unit-tested)."""
    if msg.get("family", 0) not in (0, socket.AF_UNSPEC):
        return None  # AF_BRIDGE port notifications repeat links without their kind
    name = msg.get_attr("IFLA_IFNAME") or ""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    nsid = msg.get_attr("IFLA_LINK_NETNSID")
    peer = msg.get_attr("IFLA_LINK") or 0
    if kind == "veth" and nsid is not None:
        return LinkInfo(msg["index"], name, KIND_POD_VETH, peer, nsid)
    if main_interface and name == main_interface:
        return LinkInfo(msg["index"], name, KIND_MAIN)
    return None


class NetnsResolver:
    """netnsid (as seen from our netns) -> network namespace inode."""

    def __init__(self, dirs: Iterable[Path] = (Path("/var/run/netns"),), proc: Path = Path("/proc")) -> None:
        self.dirs = list(dirs)
        self.proc = proc
        self._cache: Dict[int, Tuple[int, str]] = {}  # nsid -> (inode, path)
        self._lock = threading.Lock()

    @staticmethod
    def _nsid_of(ipr: IPRoute, path: str) -> Optional[int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            reply = ipr.get_netnsid(fd=fd)
        except Exception:  # noqa: BLE001 - a namespace that vanished under us
            return None
        finally:
            os.close(fd)
        nsid = reply.get("nsid") if reply else None
        return nsid if nsid is not None and nsid >= 0 and nsid != 0xFFFFFFFF else None

    def _candidates(self) -> Iterable[str]:
        for d in self.dirs:
            try:
                yield from (str(p) for p in sorted(d.iterdir()))
            except OSError:
                continue
        try:
            pids = [p for p in self.proc.iterdir() if p.name.isdigit()]
        except OSError:
            return
        for p in pids:
            yield str(p / "ns" / "net")

    def resolve(self, nsid: int) -> int:
        """Inode of the namespace behind nsid, 0 if it cannot be found."""
        if nsid < 0:
            return 0
        with self._lock, IPRoute() as ipr:
            hit = self._cache.get(nsid)
            if hit:
                inode, path = hit
                try:
                    if os.stat(path).st_ino == inode and self._nsid_of(ipr, path) == nsid:
                        return inode
                except OSError:
                    pass
                del self._cache[nsid]
            seen = set()
            own = os.stat("/proc/self/ns/net").st_ino
            for path in self._candidates():
                try:
                    inode = os.stat(path).st_ino
                except OSError:
                    continue
                if inode in seen or inode == own:
                    continue
                seen.add(inode)
                found = self._nsid_of(ipr, path)
                if found is not None:
                    self._cache[found] = (inode, path)
                    if found == nsid:
                        return inode
        return 0


class LinkWatcher:
    """Calls on_up(LinkInfo) for every wanted link present or appearing, on_gone(ifindex)
    when one disappears. Runs in its own thread; stop() joins it."""

    def __init__(self, on_up: Callable[[LinkInfo], None], on_gone: Callable[[int], None],
                 main_interface: Optional[str] = None, poll_s: float = 0.2) -> None:
        self.on_up = on_up
        self.on_gone = on_gone
        self.main_interface = main_interface
        self.poll_s = poll_s
        self.known: Dict[int, LinkInfo] = {}
        self.callback_errors = 0
        self.messages = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None
        self.overruns = 0
        self.ready = threading.Event()

    def start(self) -> None:
        # A plain netlink socket (parsed by pyroute2's marshal): pyroute2's own socket object
        # buffers messages internally, so select() on it can miss what is already read.
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((0, RTMGRP_LINK))  # subscribe before the dump: nothing slips between
        self._thread = threading.Thread(target=self._run, name="meshlens-linkwatch", daemon=True)
        self._thread.start()

    def _dump(self) -> None:
        """Every current link; links we knew that are gone are reported gone (resync)."""
        with IPRoute() as ipr:
            msgs = list(ipr.get_links())
        present = {m["index"] for m in msgs}
        for index in [i for i in self.known if i not in present]:
            self._handle_gone(index)
        for msg in msgs:
            self._handle(msg, "RTM_NEWLINK")

    def _run(self) -> None:
        marshal = MarshalRtnl()
        try:
            self._dump()
            self.ready.set()
            assert self._sock is not None
            while not self._stop.is_set():
                r, _, _ = select.select([self._sock], [], [], self.poll_s)
                if not r:
                    continue
                try:
                    data = self._sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.overruns += 1  # notifications were lost: resynchronise from a dump
                    log.warning("link notifications overran the socket buffer; resynchronising")
                    self._dump()
                    continue
                for msg in marshal.parse(data):
                    self._handle(msg, msg.get("event"))
        except Exception:  # noqa: BLE001 - a dead watcher is logged, the agent keeps running
            if not self._stop.is_set():
                log.exception("link watcher stopped")
        finally:
            self.ready.set()

    def _handle_gone(self, index: int) -> None:
        if self.known.pop(index, None) is not None:
            try:
                self.on_gone(index)
            except Exception:  # noqa: BLE001
                self.callback_errors += 1
                log.exception("link %s: on_gone failed", index)

    def _handle(self, msg, event: Optional[str]) -> None:
        self.messages += 1
        index = msg.get("index")
        try:
            if event == "RTM_DELLINK":
                if msg.get("family", 0) == 0:
                    self._handle_gone(index)
                return
            if event != "RTM_NEWLINK" or index in self.known:
                return
            info = classify(msg, self.main_interface)
            if info is None:
                return
            self.known[index] = info
            self.on_up(info)
        except Exception:  # noqa: BLE001 - one bad link must not stop discovery
            self.callback_errors += 1
            log.exception("link %s: %s callback failed", index, event)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock:
            self._sock.close()
            self._sock = None
