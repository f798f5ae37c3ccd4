"""The tc source's bookkeeping without the kernel: counter slots (agent/sources/tc/slots.py)
are taken lowest first, reused after release, refused (and counted) when the table is full;
the chain (agent/sources/tc/chain.py) fills `l7_progs` once both halves are there, in either
order, and empties it when either leaves."""
from __future__ import annotations

import ctypes
from typing import Dict

import pytest

from meshlens.agent.sources.tc.chain import TcChain
from meshlens.agent.sources.tc.slots import MAX_SLOTS, SlotTable, entry_index


def test_slots_lowest_first_and_stable_per_interface() -> None:
    t = SlotTable(3)
    assert [t.assign(i) for i in (41, 42, 43)] == [1, 2, 3]
    assert t.assign(42) == 2  # a repeated link notification keeps its slot
    assert t.in_use() == {41: 1, 42: 2, 43: 3}


def test_released_slot_goes_to_the_next_interface() -> None:
    t = SlotTable(3)
    for i in (41, 42, 43):
        t.assign(i)
    assert t.release(42) == 2 and t.slot_of(42) is None
    assert t.release(42) is None  # twice: nothing more to give back
    assert t.assign(97) == 2
    assert t.in_use() == {41: 1, 97: 2, 43: 3}


def test_full_table_refuses_and_counts() -> None:
    t = SlotTable(1)
    assert t.assign(5) == 1
    assert t.assign(6) is None and t.assign(7) is None
    assert t.refused == 2
    t.release(5)
    assert t.assign(7) == 1


@pytest.mark.parametrize("size", [0, -1, MAX_SLOTS + 1])
def test_table_size_must_fit_the_classid(size: int) -> None:
    with pytest.raises(ValueError, match="interface slots"):
        SlotTable(size)


def test_entry_index_matches_the_program() -> None:
    # bpf/tc.bpf.c: idx = tc_classid * 2 + dir - 2
    assert [entry_index(s, d) for s in (1, 2, 1024) for d in (0, 1)] == [0, 1, 2, 3, 2046, 2047]


class FakeArray:
    """A PROG_ARRAY stand-in: index -> program fd."""

    def __init__(self) -> None:
        self.slots: Dict[int, int] = {}

    def update_raw(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.slots[ctypes.c_uint32.from_buffer_copy(key).value] = ctypes.c_uint32.from_buffer_copy(value).value

    def delete_raw(self, key: bytes) -> bool:
        return self.slots.pop(ctypes.c_uint32.from_buffer_copy(key).value, None) is not None


@pytest.mark.parametrize("array_first", [True, False])
def test_chain_fills_the_array_in_either_order(array_first: bool) -> None:
    chain, arr = TcChain(), FakeArray()
    if array_first:
        chain.offer_array(arr)  # type: ignore[arg-type]
        assert arr.slots == {} and not chain.active
        chain.chain({"ingress": 11, "egress": 12})
    else:
        chain.chain({"ingress": 11, "egress": 12})
        assert not chain.active
        chain.offer_array(arr)  # type: ignore[arg-type]
    assert arr.slots == {0: 11, 1: 12} and chain.active


def test_chain_empties_when_either_side_stops() -> None:
    chain, arr = TcChain(), FakeArray()
    chain.offer_array(arr)  # type: ignore[arg-type]
    chain.chain({"ingress": 11, "egress": 12})
    chain.unchain()  # the L7 source stops: the counters go on without it
    assert arr.slots == {} and not chain.active
    chain.chain({"ingress": 21, "egress": 22})
    assert arr.slots == {0: 21, 1: 22}
    chain.withdraw_array()  # the tc source stops
    assert arr.slots == {} and not chain.active
    chain.unchain()  # and then the L7 source: nothing left to touch


@pytest.mark.parametrize("l7_source,features,chained", [
    ("packets", ("l4", "l7", "tc", "sat"), True),
    ("auto", ("l4", "l7", "tc", "sat"), True),     # BothHttpSource's packet half
    ("syscalls", ("l4", "l7", "tc", "sat"), False),
    ("packets", ("l4", "l7"), False),              # no tc: the parser keeps its own filters
    ("packets", ("l4", "tc"), False),              # no L7: nothing to chain
])
def test_runner_chains_the_parser_only_when_both_run(l7_source: str, features: tuple, chained: bool) -> None:
    from meshlens.agent.kernel.features import KernelFeatures
    from meshlens.agent.runner import AgentConfig, default_sources
    from meshlens.agent.sources.l7.packets import PacketHttpSource
    from meshlens.agent.sources.tc.source import TcSource

    kf = KernelFeatures("6.18", True, None, True, False, -1)  # construction only: nothing is loaded
    sources = default_sources(AgentConfig(l7_source=l7_source, features=features), kf)
    tc = [s for s in sources if isinstance(s, TcSource)]
    pkt = [p for s in sources for p in (s, getattr(s, "packets", None)) if isinstance(p, PacketHttpSource)]
    chains = {id(x.chain) for x in tc + pkt if x.chain is not None}
    if chained:
        assert len(tc) == 1 and len(pkt) == 1 and tc[0].chain is pkt[0].chain is not None
    else:
        assert chains == set()


class FakeIfaces:
    """`pkt_ifaces` stand-in."""

    def __init__(self) -> None:
        self.entries: Dict[bytes, bytes] = {}

    def update_raw(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.entries[key] = value

    def delete_raw(self, key: bytes) -> bool:
        return self.entries.pop(key, None) is not None


class FakeObj:
    def __init__(self) -> None:
        self.ifaces = FakeIfaces()

    def map(self, name: str) -> FakeIfaces:
        assert name == "pkt_ifaces"
        return self.ifaces


def chained_packet_source(chain: TcChain, told: list):
    """A chained PacketHttpSource with its kernel half faked: only its link bookkeeping runs."""
    from meshlens.agent.sources.l7.packets import PacketHttpSource

    src = PacketHttpSource(on_pod_netns=lambda netns, covered: told.append((netns, covered)), watch=False)
    src.obj = FakeObj()  # type: ignore[assignment]
    src.chain, src.chained = chain, True
    chain.listen(src._tc_attached)
    src.resolver.resolve = lambda nsid: 7000 + nsid  # type: ignore[method-assign]
    return src


def veth(ifindex: int):
    from meshlens.agent.sources.tc.link_watch import KIND_POD_VETH, LinkInfo

    return LinkInfo(ifindex, f"veth{ifindex}", KIND_POD_VETH, peer_ifindex=2, peer_netnsid=ifindex)


@pytest.mark.parametrize("tc_first", [True, False], ids=["tc first", "l7 first"])
def test_chained_parser_claims_a_pod_only_once_its_veth_has_the_tc_filters(tc_first: bool) -> None:
    chain, told = TcChain(), []
    src = chained_packet_source(chain, told)
    if tc_first:
        chain.interface_attached(5, True)
        src.link_up(veth(5))
    else:
        src.link_up(veth(5))
        assert told == [], "not claimed before the tc source has attached"
        chain.interface_attached(5, True)
    chain.interface_attached(5, True)   # a repeated notification claims nothing twice
    assert told == [(7005, True)]
    src.link_gone(5)
    chain.interface_gone(5)
    assert told == [(7005, True), (7005, False)]


@pytest.mark.parametrize("tc_first", [True, False], ids=["tc first", "l7 first"])
def test_a_veth_the_tc_source_failed_on_stays_with_the_other_path(tc_first: bool) -> None:
    chain, told = TcChain(), []
    src = chained_packet_source(chain, told)
    if tc_first:
        chain.interface_attached(6, False)
        src.link_up(veth(6))
    else:
        src.link_up(veth(6))
        chain.interface_attached(6, False)
    chain.interface_attached(6, False)
    assert told == [] and src.attach_errors == 1
    src.link_gone(6)
    assert told == [], "never claimed, so nothing to give back"
    assert src.obj.ifaces.entries == {}   # type: ignore[union-attr]
