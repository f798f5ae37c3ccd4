"""TcAttacher's rules against a fake netlink (no privileges): a clsact that exists is shared
and never deleted; one we created is deleted only when no filter is left on it; detach
deletes exactly our (parent, prio, handle); a failed attach leaves nothing of ours behind;
stale filters are those whose program no live process holds."""
from __future__ import annotations

import errno
from typing import List, Tuple

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from meshlens.agent.sources.tc import attach as tc_attach
from meshlens.agent.sources.tc.attach import EGRESS_PARENT, FILTER_PRIO, INGRESS_PARENT, TcAttacher, TcFilter


class FakeMsg(dict):
    def __init__(self, attrs, **fields):
        super().__init__(**fields)
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


class FakeIPRoute:
    """Just enough of pyroute2.IPRoute: one clsact per ifindex, filters as tuples."""

    qdiscs: set = set()
    filters: List[Tuple[int, int, int, int, str]] = []  # (ifindex, parent, prio, handle, name)
    calls: List[tuple] = []
    fail_egress = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def tc(self, cmd, kind, index, handle=None, **kw):
        FakeIPRoute.calls.append((cmd, kind, index, handle, kw.get("parent"), kw.get("prio")))
        if cmd == "add" and kind == "clsact":
            if index in self.qdiscs:
                raise NetlinkError(errno.EEXIST)
            self.qdiscs.add(index)
        elif cmd == "del" and kind == "clsact":
            self.qdiscs.discard(index)
            FakeIPRoute.filters = [f for f in self.filters if f[0] != index]
        elif cmd == "add-filter":
            if self.fail_egress and kw["parent"] == EGRESS_PARENT:
                raise NetlinkError(errno.EINVAL)
            key = (index, kw["parent"], kw["prio"], handle)
            if any(f[:4] == key for f in self.filters):
                raise NetlinkError(errno.EEXIST)
            self.filters.append(key + (kw["name"],))
        elif cmd == "del-filter":
            key = (index, kw["parent"], kw["prio"], handle)
            before = len(self.filters)
            FakeIPRoute.filters = [f for f in self.filters if f[:4] != key]
            if len(self.filters) == before:
                raise NetlinkError(errno.ENOENT)

    def get_qdiscs(self, index):
        return [FakeMsg({"TCA_KIND": "clsact"}, parent=0xFFFFFFF1, handle=0xFFFF0000)] if index in self.qdiscs else []

    def get_filters(self, index, parent):
        if index not in self.qdiscs:
            raise NetlinkError(errno.EINVAL)
        return [FakeMsg({"TCA_KIND": "bpf", "TCA_OPTIONS": {"attrs": [("TCA_BPF_NAME", f[4])]}},
                        handle=f[3], info=f[2] << 16) for f in self.filters if f[0] == index and f[1] == parent]


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    FakeIPRoute.qdiscs, FakeIPRoute.filters, FakeIPRoute.calls, FakeIPRoute.fail_egress = set(), [], [], False
    monkeypatch.setattr(tc_attach, "IPRoute", FakeIPRoute)
    return FakeIPRoute


def ours(index: int) -> List[tuple]:
    return [f for f in FakeIPRoute.filters if f[0] == index and f[4].startswith("meshlens-tc-")]


def test_attach_creates_clsact_and_both_filters_then_detach_removes_both() -> None:
    a = TcAttacher({"ingress": 10, "egress": 11}, handle=77)
    att = a.attach(5, "veth5")
    assert att.created_qdisc and sorted(att.directions) == ["egress", "ingress"]
    assert sorted(f[1] for f in ours(5)) == [INGRESS_PARENT, EGRESS_PARENT]
    assert all(f[2] == FILTER_PRIO and f[3] == 77 for f in ours(5))
    a.detach(5)
    assert ours(5) == [] and 5 not in FakeIPRoute.qdiscs  # ours, and nothing else on it


def test_existing_clsact_is_shared_and_kept() -> None:
    FakeIPRoute.qdiscs.add(5)
    a = TcAttacher({"ingress": 10, "egress": 11}, handle=77)
    assert a.attach(5, "veth5").created_qdisc is False
    a.detach_all()
    assert 5 in FakeIPRoute.qdiscs and ours(5) == []
    assert not any(c[0] == "del" for c in FakeIPRoute.calls)


def test_created_clsact_kept_while_a_foreign_filter_uses_it() -> None:
    a = TcAttacher({"ingress": 10, "egress": 11}, handle=77)
    a.attach(5, "veth5")
    FakeIPRoute.filters.append((5, EGRESS_PARENT, 1, 9, "someone-else"))
    a.detach(5)
    assert 5 in FakeIPRoute.qdiscs
    assert FakeIPRoute.filters == [(5, EGRESS_PARENT, 1, 9, "someone-else")]


def test_detach_touches_only_our_handle() -> None:
    other = TcAttacher({"ingress": 20, "egress": 21}, handle=88)  # another agent, same prio
    other.attach(5, "veth5")
    a = TcAttacher({"ingress": 10, "egress": 11}, handle=77)
    a.attach(5, "veth5")
    a.detach(5)
    assert sorted(f[3] for f in ours(5)) == [88, 88]


def test_failed_attach_leaves_nothing_of_ours() -> None:
    FakeIPRoute.fail_egress = True
    a = TcAttacher({"ingress": 10, "egress": 11}, handle=77)
    with pytest.raises(tc_attach.TcAttachError):
        a.attach(5, "veth5")
    assert ours(5) == [] and 5 not in FakeIPRoute.qdiscs and a.attached == {}


def test_stale_filters_are_those_no_live_process_holds(monkeypatch) -> None:
    found = [TcFilter(5, INGRESS_PARENT, FILTER_PRIO, 77, "meshlens-tc-ingress", 1001),
             TcFilter(5, INGRESS_PARENT, FILTER_PRIO, 88, "meshlens-tc-ingress", 2002)]
    monkeypatch.setattr(tc_attach, "our_filters", lambda ipr, i: found if i == 5 else [])
    deleted = []
    monkeypatch.setattr(tc_attach, "delete_filter", lambda ipr, f: deleted.append(f) or True)
    removed = tc_attach.remove_stale_filters([5, 6], held=lambda: {2002})
    assert removed == [found[0]] and deleted == [found[0]]
