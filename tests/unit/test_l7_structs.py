"""The L7 ctypes mirrors match l7.bpf.o's BTF; bucket bounds and counters agree with the kernel."""
from __future__ import annotations

import ctypes

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.btf_layout import ObjectBtf, compare
from meshlens.agent.sources.l7.structs import (
    COUNTER_NAMES,
    DURATION_BOUNDS_S,
    MIRRORS,
    ML_L7_CNT_MAX,
    PARSE_ERRORS,
    SIZE_BOUNDS_BYTES,
    PKT_MIRRORS,
    L7CgRodata,
    L7PktRodata,
    MlCgSock,
    L7Rodata,
    kernel_bucket,
)


@pytest.fixture(scope="module")
def l7_btf():
    with ObjectBtf(bpf.object_path("l7")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_l7_mirror_matches_btf(l7_btf, struct_name: str) -> None:
    layout = l7_btf.struct(struct_name)
    assert layout.size == ctypes.sizeof(MIRRORS[struct_name])
    assert compare(layout, MIRRORS[struct_name]) == []


def test_rodata_knobs_match_btf(l7_btf) -> None:
    # Offsets as libbpf lays out .rodata at open (agent/btf_layout reads the opened object).
    assert compare(l7_btf.datasec(".rodata"), L7Rodata) == []


def test_counters_fit_and_parse_errors_are_counters() -> None:
    assert len(COUNTER_NAMES) <= ML_L7_CNT_MAX
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)
    assert set(PARSE_ERRORS) <= set(COUNTER_NAMES)


def test_bucket_bounds_are_the_otel_ones() -> None:
    assert DURATION_BOUNDS_S == (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
    assert SIZE_BOUNDS_BYTES[:3] == (0, 64, 256) and SIZE_BOUNDS_BYTES[-1] == 16 * 1024 * 1024
    assert kernel_bucket(DURATION_BOUNDS_S, 0.05) == 3       # <= bound: Prometheus `le`
    assert kernel_bucket(DURATION_BOUNDS_S, 0.0501) == 4
    assert kernel_bucket(DURATION_BOUNDS_S, 11.0) == len(DURATION_BOUNDS_S)


@pytest.fixture(scope="module")
def l7pkt_btf():
    with ObjectBtf(bpf.object_path("l7pkt")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_packet_path_shares_the_record_and_key_layouts(l7pkt_btf, struct_name: str) -> None:
    """l7pkt.bpf.o fills the same http_stats / l7_events the syscall path does."""
    layout = l7pkt_btf.struct(struct_name)
    assert compare(layout, MIRRORS[struct_name]) == []


@pytest.mark.parametrize("struct_name", sorted(PKT_MIRRORS))
def test_l7pkt_mirror_matches_btf(l7pkt_btf, struct_name: str) -> None:
    layout = l7pkt_btf.struct(struct_name)
    assert layout.size == ctypes.sizeof(PKT_MIRRORS[struct_name])
    assert compare(layout, PKT_MIRRORS[struct_name]) == []


def test_l7pkt_rodata_knobs_match_btf(l7pkt_btf) -> None:
    assert compare(l7pkt_btf.datasec(".rodata"), L7PktRodata) == []


@pytest.fixture(scope="module")
def l7cg_btf():
    with ObjectBtf(bpf.object_path("l7cg")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_cgroup_skb_path_shares_the_record_and_key_layouts(l7cg_btf, struct_name: str) -> None:
    """l7cg.bpf.o fills the same http_stats / l7_events as the other two objects."""
    assert compare(l7cg_btf.struct(struct_name), MIRRORS[struct_name]) == []


@pytest.mark.parametrize("struct_name", sorted(set(PKT_MIRRORS) - {"ml_pkt_iface"}))   # tc only
def test_l7cg_shares_the_packet_mirrors(l7cg_btf, struct_name: str) -> None:
    assert compare(l7cg_btf.struct(struct_name), PKT_MIRRORS[struct_name]) == []


def test_l7cg_sock_storage_and_rodata_match_btf(l7cg_btf) -> None:
    assert compare(l7cg_btf.struct("ml_cg_sock"), MlCgSock) == []
    assert compare(l7cg_btf.datasec(".rodata"), L7CgRodata) == []
