"""--l7-source selection and the merge of the packet and syscall paths' snapshots (no kernel)."""
from __future__ import annotations

import pytest

from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSnapshot, HttpStats
from meshlens.agent.sources.l7.packets import PacketHttpSource
from meshlens.agent.sources.l7.select import BothHttpSource, l7_sources_for
from meshlens.agent.sources.l7.http import HttpSource


class FakePart:
    def __init__(self, snap: HttpSnapshot) -> None:
        self.snap = snap
        self.swept = 0

    def sweep(self, now_ns: int) -> None:
        self.swept += 1

    def snapshot(self) -> HttpSnapshot:
        return self.snap


def key(cgroup: int, process: str, status: int = 200) -> HttpSeriesKey:
    return HttpSeriesKey("server", process, cgroup, 4026532000, "GET", status, "/x", "10.0.0.2", 80)


def stats(n: int) -> HttpStats:
    st = HttpStats()
    for _ in range(n):
        st.count += 1
        st.duration.observe(0.003)
    return st


def test_modes() -> None:
    assert [type(s) for s in l7_sources_for("syscalls")][0] is HttpSource
    assert [type(s) for s in l7_sources_for("packets")][0] is PacketHttpSource
    both = l7_sources_for("auto")
    assert isinstance(both[0], BothHttpSource) and both[1].tracker is both[0].dns
    assert both[0].packets.dns is both[0].cgroup.dns is both[0].syscalls.dns, "one DNS tracker pairs every path's records"
    assert both[0].other is both[0].cgroup, "auto: cgroup_skb for what no pod veth carries, no syscalls"
    both[0].packets.on_pod_netns(4026532333, True)   # a pod veth the tc path parses
    assert both[0].cgroup._covered == both[0].syscalls._covered == {4026532333}
    with pytest.raises(ValueError, match="l7-source"):
        l7_sources_for("ebpf")


def test_merge_keeps_series_apart_and_sums_shared_ones() -> None:
    both = BothHttpSource()
    pkt = FakePart(HttpSnapshot({key(0, ""): stats(7), key(5, "nginx", 404): stats(1)}, {"pkt_desync": 2, "bad_start": 1}, 1, 0))
    sysc = FakePart(HttpSnapshot({key(5, "nginx"): stats(3), key(5, "nginx", 404): stats(2)}, {"bad_start": 4}, 0, 3))
    both._started = [sysc, pkt]  # type: ignore[list-item]
    both.sweep(0)
    snap = both.snapshot()
    assert {k: st.count for k, st in snap.series.items()} == {
        key(0, ""): 7, key(5, "nginx"): 3, key(5, "nginx", 404): 3}
    assert snap.series[key(5, "nginx", 404)].duration.count == 3
    assert snap.parse_errors == {"pkt_desync": 2, "bad_start": 5}
    assert (snap.route_overflows, snap.overflow_records) == (1, 3)
    assert pkt.swept == sysc.swept == 1


def test_cover_netns_before_start_is_remembered() -> None:
    src = HttpSource()
    src.cover_netns(4026532111, True)
    src.cover_netns(4026532222, True)
    src.cover_netns(4026532111, False)
    assert src._covered == {4026532222}


def test_auto_uses_cgroup_skb_for_everything_when_the_kernel_refuses_the_packet_path(monkeypatch) -> None:
    """Attach with fallbacks: a verifier that rejects l7pkt.bpf.o (Debian's 6.1 once did)
    leaves cgroup_skb parsing every socket (pod traffic included), says why, and
    un-registers the pods it had skipped."""
    from meshlens.agent.kernel.bpf import BpfError

    both = l7_sources_for("auto")[0]
    monkeypatch.setattr(both.cgroup, "start", lambda: None)
    monkeypatch.setattr(both.syscalls, "start", lambda: pytest.fail("no syscall tracepoint in auto"))
    both.cgroup._covered.add(4026532001)

    def refuse() -> None:
        raise BpfError("load l7pkt.bpf.o", 13, ["invalid zero-sized read"])

    monkeypatch.setattr(both.packets, "start", refuse)
    both.start()
    assert both.packets_refused == "[Errno 13] load l7pkt.bpf.o: Permission denied"
    assert both.cgroup._covered == set()
    report = {c.signal: c for c in both.attach_report()}
    assert report["l7_pod_traffic"].chosen == "cgroup_skb (all traffic)"
    assert report["l7_pod_traffic"].tried == ["packets: [Errno 13] load l7pkt.bpf.o: Permission denied"]
    assert both.ring_buffers() == both.cgroup.ring_buffers()


def test_auto_falls_back_to_syscalls_when_the_kernel_refuses_cgroup_skb(monkeypatch) -> None:
    """A kernel that refuses l7cg.bpf.o: the syscall path takes the traffic no pod veth
    carries (skipping the pods the packet path parses), and `check` says why."""
    from meshlens.agent.kernel.attach import AttachChoice
    from meshlens.agent.kernel.bpf import BpfError

    both = l7_sources_for("auto")[0]

    def refuse() -> None:
        raise BpfError("load l7cg.bpf.o", 22, ["R1 invalid mem access"])

    monkeypatch.setattr(both.cgroup, "start", refuse)
    monkeypatch.setattr(both.syscalls, "start", lambda: None)
    monkeypatch.setattr(both.packets, "start", lambda: None)
    monkeypatch.setattr(both.packets, "attach_report", lambda: [])
    monkeypatch.setattr(both.syscalls, "attach_report",
                        lambda: [AttachChoice("l7_payload", "tracepoint", ["exit_syscall"])])
    both.packets.on_pod_netns(4026532444, True)
    both.start()
    assert both.other is both.syscalls and both.syscalls._covered == {4026532444}
    assert both.cgroup_refused == "[Errno 22] load l7cg.bpf.o: Invalid argument"
    other = {c.signal: c for c in both.attach_report()}["l7_other_traffic"]
    assert other.chosen.startswith("syscalls")
    assert other.tried[-1] == "cgroup_skb: [Errno 22] load l7cg.bpf.o: Invalid argument"
    assert any(t.startswith("fentry tcp_sendmsg/tcp_recvmsg") for t in other.tried)
