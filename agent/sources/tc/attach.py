"""Attach and detach the tc programs of bpf/tc.bpf.c on one interface, over netlink (pyroute2),
from the agent's own process with the program fds (DESIGN.md: `ip netns exec` remounts
sysfs, so no shelling out).

Called by agent/sources/tc/link_watch.py (through agent/sources/tc/source.py) when a pod's veth appears, and by
agent/sources/tc/source.py at start-up to remove what a crashed agent left behind.

Rules (libbpf-bootstrap's tc hooks): a clsact qdisc that already exists is shared with
someone else and never deleted; one we created is deleted on detach only if no filter is
left on it. Our filters are bpf, direct-action, named `meshlens-tc-ingress` /
`meshlens-tc-egress`, at a fixed priority (FILTER_PRIO) with the agent's pid as handle, so
`tc filter show` tells whose they are and a second agent on the same machine (tests) does
not collide. Detach removes exactly (parent, prio, handle) of our own filters.

A filter is stale when its name is ours and no live process holds its program (a tc filter
keeps the program alive after its agent died): `remove_stale_filters` deletes exactly those,
so a restarted agent never stacks a second copy and a concurrently running agent keeps its own.
"""
from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("meshlens.tc")

TC_H_CLSACT_PARENT = 0xFFFFFFF1
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
PARENTS = {"ingress": INGRESS_PARENT, "egress": EGRESS_PARENT}
FILTER_PRIO = 0x6D6C            # "ml": after Cilium-style prio 1, before tc's default 49152
ETH_P_ALL = 0x0003
NAME_PREFIX = "meshlens-tc-"
TCA_BPF_ID = 11


NAME_PREFIXES = (NAME_PREFIX, "meshlens-l7-")   # interface counters; L7 from packets


def filter_name(direction: str, kind: str = "") -> str:
    """`meshlens-tc-ingress` (interface counters) or `meshlens-<kind>-ingress` (`l7`)."""
    return f"meshlens-{kind}-{direction}" if kind else f"{NAME_PREFIX}{direction}"


_attachers: Dict[int, "itertools.count[int]"] = collections.defaultdict(itertools.count)


def default_handle(prio: int = 0) -> int:
    """Our filters' handle: the agent's pid (non-zero, unique among live agents). A second
    attacher at the same priority in one process (tests run two agents' worth of sources in
    one process) adds its number above the pid's 22 bits."""
    return ((next(_attachers[prio]) & 0x3FF) << 22 | (os.getpid() & 0x3FFFFF)) or 1


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    parent: int
    prio: int
    handle: int
    name: str
    prog_id: int


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    created_qdisc: bool
    directions: List[str] = field(default_factory=list)


class TcAttachError(RuntimeError):
    pass


def _nla_u32(nla) -> int:
    """Value of a u32 attribute pyroute2 did not decode (e.g. TCA_BPF_ID)."""
    raw = nla.data[nla.offset + 4:nla.offset + 8]
    return int.from_bytes(raw, "little")


def list_filters(ipr: IPRoute, ifindex: int) -> List[TcFilter]:
    """Every bpf filter on the clsact hooks of ifindex, ours or not."""
    out = []
    for parent in (INGRESS_PARENT, EGRESS_PARENT):
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
                continue  # no clsact qdisc, or the link is gone
            raise
        for m in msgs:
            opts = m.get_attr("TCA_OPTIONS")
            if m.get_attr("TCA_KIND") != "bpf" or not opts or not m["handle"]:
                continue
            name, prog_id = "", 0
            for attr in opts["attrs"]:
                if attr[0] == "TCA_BPF_NAME":
                    name = attr[1]
                elif attr[0] == "UNKNOWN" and attr[1]["header"]["type"] == TCA_BPF_ID:
                    prog_id = _nla_u32(attr[1])
            out.append(TcFilter(ifindex, parent, (m["info"] >> 16) & 0xFFFF, m["handle"], name, prog_id))
    return out


def our_filters(ipr: IPRoute, ifindex: int) -> List[TcFilter]:
    return [f for f in list_filters(ipr, ifindex) if f.name.startswith(NAME_PREFIXES)]


def delete_filter(ipr: IPRoute, f: TcFilter) -> bool:
    """Delete exactly this filter (parent, prio, handle); False if it was already gone."""
    try:
        ipr.tc("del-filter", "bpf", f.ifindex, f.handle, parent=f.parent, prio=f.prio, protocol=ETH_P_ALL)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise


class HolderScan(set):
    """Ids of BPF programs some live process holds; `complete` is False when the fds of some
    meshlens process could not be read (no CAP_SYS_PTRACE over it) or /proc does not show
    the node's processes (a container without hostPID): then absence proves nothing.
    Unreadable processes that are not meshlens (by their world-readable cmdline) are
    skipped: only an agent holds the programs its filters run."""

    def __init__(self, ids: Iterable[int] = (), complete: bool = True) -> None:
        super().__init__(ids)
        self.complete = complete


def _is_meshlens(pid_dir: Path) -> bool:
    try:
        return b"meshlens" in (pid_dir / "cmdline").read_bytes()
    except OSError:
        return False


def held_prog_ids(proc: Path = Path("/proc"), host_pid: Optional[bool] = None) -> HolderScan:
    """Ids of BPF programs some live process holds through a program or link fd."""
    from meshlens.agent.kernel.capabilities import in_host_pid_namespace

    ids = HolderScan(complete=in_host_pid_namespace() if host_pid is None else host_pid)
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except FileNotFoundError:
            continue
        except OSError:
            ids.complete = ids.complete and not _is_meshlens(pid_dir)
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            except OSError:
                ids.complete = ids.complete and not _is_meshlens(pid_dir)
                break
            if not target.startswith(("anon_inode:bpf-prog", "anon_inode:bpf_link")):
                continue
            try:
                text = (pid_dir / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def remove_stale_filters(ifindexes: Optional[Iterable[int]] = None,
                         held: Optional[Callable[[], Set[int]]] = None) -> List[TcFilter]:
    """Delete meshlens filters whose program no live process holds (left by a crashed agent)
    on the given interfaces (default: every link of this netns). Returns what was removed.
    When the scan of holders is incomplete nothing is removed: a filter whose holder cannot
    be seen may belong to a live agent."""
    removed: List[TcFilter] = []
    with IPRoute() as ipr:
        if ifindexes is None:
            ifindexes = [link["index"] for link in ipr.get_links()]
        candidates = [f for i in ifindexes for f in our_filters(ipr, i)]
        if not candidates:
            return removed
        alive = (held or held_prog_ids)()
        if not getattr(alive, "complete", True):
            log.warning("%d meshlens tc filters found whose holders cannot be checked (needs hostPID and "
                        "CAP_SYS_PTRACE): left in place", sum(1 for f in candidates if f.prog_id not in alive))
            return removed
        for f in candidates:
            if f.prog_id in alive:
                continue
            if delete_filter(ipr, f):
                removed.append(f)
    for f in removed:
        log.warning("removed stale tc filter %s on ifindex %d (handle %#x, prog %d)", f.name, f.ifindex, f.handle, f.prog_id)
    return removed


_ATTACH_LOCK = threading.Lock()


class TcAttacher:
    """Attaches the ingress/egress programs to interfaces; remembers what it created.

    Thread-safe: the link watcher attaches from its thread, the source detaches on stop.
    """

    def __init__(self, prog_fds: Dict[str, int], handle: Optional[int] = None, prio: int = FILTER_PRIO,
                 kind: str = "") -> None:
        self.prog_fds = dict(prog_fds)  # direction -> program fd
        self.kind = kind                # filter name part: "" (counters) or "l7"
        self.handle = handle if handle is not None else default_handle(prio)
        self.prio = prio
        self.attached: Dict[int, Attachment] = {}
        # one lock for every attacher of the process: the counters and the L7 programs attach
        # to the same new veth from two watcher threads, and the clsact check-then-add races
        self._lock = _ATTACH_LOCK

    def attach(self, ifindex: int, ifname: str, classid: Optional[int] = 1) -> Attachment:
        """Both filters on ifindex, with `classid` (the programs read it as skb->tc_classid:
        the tc counters' slot; None: none)."""
        with self._lock, IPRoute() as ipr:
            if ifindex in self.attached:
                return self.attached[ifindex]
            created = self._ensure_clsact(ipr, ifindex, ifname)
            att = Attachment(ifindex, ifname, created)
            try:
                for direction, fd in self.prog_fds.items():
                    self._add_filter(ipr, ifindex, direction, fd, classid)
                    att.directions.append(direction)
            except Exception:
                self._remove(ipr, att)
                raise
            self.attached[ifindex] = att
            return att

    def _ensure_clsact(self, ipr: IPRoute, ifindex: int, ifname: str) -> bool:
        try:
            ipr.tc("add", "clsact", ifindex)
            return True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise TcAttachError(f"{ifname}: cannot add clsact qdisc: {exc}") from exc
        for attempt in range(5):
            for q in ipr.get_qdiscs(index=ifindex):
                if q["parent"] == TC_H_CLSACT_PARENT and q.get_attr("TCA_KIND") == "clsact":
                    return False  # shared with whoever created it
            # another process (a second agent) may be adding its clsact right now: the add
            # said EEXIST before the dump shows it
            time.sleep(0.02 * (attempt + 1))
        raise TcAttachError(f"{ifname}: an ingress qdisc other than clsact is in the way")

    def _add_filter(self, ipr: IPRoute, ifindex: int, direction: str, fd: int, classid: Optional[int]) -> None:
        try:
            ipr.tc("add-filter", "bpf", ifindex, self.handle, fd=fd, name=filter_name(direction, self.kind),
                   parent=PARENTS[direction], classid=classid, direct_action=True, prio=self.prio, protocol=ETH_P_ALL)
        except NetlinkError as exc:
            raise TcAttachError(f"ifindex {ifindex}: cannot add {direction} filter: {exc}") from exc

    def detach(self, ifindex: int) -> None:
        with self._lock, IPRoute() as ipr:
            att = self.attached.pop(ifindex, None)
            if att:
                self._remove(ipr, att)

    def forget(self, ifindex: int) -> None:
        """The link is gone (its filters and qdisc went with it)."""
        with self._lock:
            self.attached.pop(ifindex, None)

    def detach_all(self) -> None:
        with self._lock, IPRoute() as ipr:
            while self.attached:
                _, att = self.attached.popitem()
                try:
                    self._remove(ipr, att)
                except Exception:  # noqa: BLE001 - keep detaching the others
                    log.exception("detaching tc filters from %s", att.ifname)

    def _remove(self, ipr: IPRoute, att: Attachment) -> None:
        for direction in list(att.directions):
            delete_filter(ipr, TcFilter(att.ifindex, PARENTS[direction], self.prio, self.handle, "", 0))
            att.directions.remove(direction)
        if att.created_qdisc and not self._has_filters(ipr, att.ifindex):
            try:
                ipr.tc("del", "clsact", att.ifindex)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise

    @staticmethod
    def _has_filters(ipr: IPRoute, ifindex: int) -> bool:
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            try:
                if any(m["handle"] for m in ipr.get_filters(index=ifindex, parent=parent)):
                    return True
            except NetlinkError:
                continue
        return False
