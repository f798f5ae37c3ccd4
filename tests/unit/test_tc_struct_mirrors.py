"""The tc ctypes mirrors (agent/sources/tc/structs.py) match bpf/tc.bpf.c's BTF, and the pure
helpers that decode its maps (per-CPU split, sums, log2 RTT slots) agree with the kernel's
conventions. No privileges needed."""
from __future__ import annotations

import ctypes

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.btf_layout import ObjectBtf, compare
from meshlens.agent.sources.tc.structs import (
    CNT_MAX,
    COUNTER_NAMES,
    MIRRORS,
    PARSE_FAILURE_REASONS,
    RTT_SLOTS,
    TcIfStats,
    percpu_values,
    rtt_bucket_bounds,
    rtt_slot,
    sum_structs,
)


@pytest.fixture(scope="module")
def tc_btf():
    with ObjectBtf(bpf.object_path("tc")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_tc_mirror_matches_btf(tc_btf, struct_name: str) -> None:
    layout = tc_btf.struct(struct_name)
    assert layout.size == ctypes.sizeof(MIRRORS[struct_name])
    assert compare(layout, MIRRORS[struct_name]) == []


def test_counter_names_fit_and_cover_reasons() -> None:
    assert len(COUNTER_NAMES) <= CNT_MAX
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)
    assert set(PARSE_FAILURE_REASONS) <= set(COUNTER_NAMES)


def test_percpu_values_and_sum() -> None:
    a, b = TcIfStats(packets=3, bytes=100), TcIfStats(packets=4, bytes=60, tcp_syn=1)
    raw = bytes(a) + bytes(b)  # 64-byte structs: already 8-aligned, no per-CPU padding
    vals = percpu_values(raw, TcIfStats, 2)
    total = sum_structs(vals, TcIfStats)
    assert (total.packets, total.bytes, total.tcp_syn) == (7, 160, 1)


@pytest.mark.parametrize("us,slot", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (1023, 10), (1024, 11), (10**12, RTT_SLOTS - 1)])
def test_rtt_slot_is_bit_length(us: int, slot: int) -> None:
    assert rtt_slot(us) == slot


def test_rtt_bounds_contain_their_slot() -> None:
    bounds = rtt_bucket_bounds()
    assert len(bounds) == RTT_SLOTS - 1
    for us in (0, 1, 5, 999, 150_000):
        s = rtt_slot(us)
        assert us * 1e-6 <= bounds[s]
        assert s == 0 or us * 1e-6 > bounds[s - 1] - 1e-12
