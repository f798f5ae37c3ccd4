"""One tc filter per hook: the interface counters (bpf/tc.bpf.c) run the packet L7 parser
(bpf/l7pkt.bpf.c) by a tail call through the counters' PROG_ARRAY `l7_progs`, instead of the
parser sitting in a second filter behind them.

The runner gives one TcChain to the tc source and to the packet L7 source. The tc source
offers its array once its object is loaded; the L7 source chains its two programs once its
own is. Whichever comes second fills the array, so start order does not matter. A chained
L7 source attaches no filters of its own: it rides on the tc source's filters (every pod veth
the tc source attaches to) and only registers the veths it parses in its `pkt_ifaces`.
Either stopping empties the array (the counter programs' tail call then falls through, and
the counts go on). Without a chain each source works alone, as before.

The chain also says which veths the counter filters are really on (`interface_attached`): a
chained parser runs only where they are, so the L7 source claims a pod for the packet path
(and the cgroup_skb path skips it) only once its veth's filters are in; a veth the tc source
failed to attach to stays with the cgroup_skb path instead of going unparsed.

Upstream: agent/sources/tc/source.py (offer_array/withdraw_array), agent/sources/l7/packets.py
(chain/unchain). Downstream: the kernel's `l7_progs` map.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Callable, Dict, List, Optional

from meshlens.agent.kernel import bpf

log = logging.getLogger("meshlens.tc")

INDEX = {"ingress": 0, "egress": 1}   # l7_progs index = the counter program's direction


class TcChain:
    """The meeting point of the tc source's `l7_progs` and the L7 parser's program fds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._array: Optional[bpf.Map] = None
        self._fds: Dict[str, int] = {}
        self._attached: Dict[int, bool] = {}   # ifindex -> the counter filters are on it
        self._listeners: List[Callable[[int, bool], None]] = []

    def offer_array(self, array: bpf.Map) -> None:
        """The tc source's `l7_progs`, loaded; fills it if the parser is already waiting."""
        with self._lock:
            self._array = array
            self._install()

    def withdraw_array(self) -> None:
        """The tc source is stopping: its array goes with its object."""
        with self._lock:
            if self._array is not None and self._fds:
                self._clear()
            self._array = None

    def chain(self, fds: Dict[str, int]) -> None:
        """The parser's program fd per direction ("ingress", "egress")."""
        with self._lock:
            self._fds = dict(fds)
            self._install()

    def unchain(self) -> None:
        """The parser is stopping: the counter programs stop calling it."""
        with self._lock:
            if self._array is not None:
                self._clear()
            self._fds = {}

    def interface_attached(self, ifindex: int, attached: bool) -> None:
        """The tc source attached its filters to this veth (or failed to)."""
        with self._lock:
            self._attached[ifindex] = attached
            listeners = list(self._listeners)
        for cb in listeners:
            cb(ifindex, attached)

    def interface_gone(self, ifindex: int) -> None:
        with self._lock:
            self._attached.pop(ifindex, None)

    def attached(self, ifindex: int) -> Optional[bool]:
        """Whether the counter filters are on this veth; None while the tc source has not
        said (its link watcher runs on its own thread)."""
        with self._lock:
            return self._attached.get(ifindex)

    def listen(self, cb: Callable[[int, bool], None]) -> None:
        """cb(ifindex, attached) after every interface_attached."""
        with self._lock:
            self._listeners.append(cb)

    def unlisten(self, cb: Callable[[int, bool], None]) -> None:
        with self._lock:
            if cb in self._listeners:
                self._listeners.remove(cb)

    @property
    def active(self) -> bool:
        """Both halves are here: the counter programs run the parser."""
        with self._lock:
            return self._array is not None and bool(self._fds)

    def _install(self) -> None:
        if self._array is None or not self._fds:
            return
        for direction, fd in self._fds.items():
            self._array.update_raw(bytes(ctypes.c_uint32(INDEX[direction])), bytes(ctypes.c_uint32(fd)))
        log.info("tc: the L7 packet parser runs from the counter programs (one filter per hook)")

    def _clear(self) -> None:
        assert self._array is not None
        for index in INDEX.values():
            try:
                self._array.delete_raw(bytes(ctypes.c_uint32(index)))
            except bpf.BpfError as exc:  # the map is being torn down
                log.debug("tc: l7_progs[%d]: %s", index, exc)
