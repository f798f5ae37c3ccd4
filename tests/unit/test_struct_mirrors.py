"""Every ctypes mirror matches the compiled object's BTF: size, field names, offsets, sizes."""
from __future__ import annotations

import ctypes

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.btf_layout import ObjectBtf, compare
from meshlens.agent.sources.tcp.structs import COUNTER_NAMES, MIRRORS, TcpconnRodata


@pytest.fixture(scope="module")
def tcpconn_btf():
    with ObjectBtf(bpf.object_path("tcpconn")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_tcpconn_mirror_matches_btf(tcpconn_btf, struct_name: str) -> None:
    layout = tcpconn_btf.struct(struct_name)
    assert layout.size == ctypes.sizeof(MIRRORS[struct_name])
    assert compare(layout, MIRRORS[struct_name]) == []


def test_rodata_knobs_match_btf(tcpconn_btf) -> None:
    assert compare(tcpconn_btf.datasec(".rodata"), TcpconnRodata) == []


def test_compare_reports_a_wrong_offset(tcpconn_btf) -> None:
    class Shifted(ctypes.Structure):
        _fields_ = [("sk", ctypes.c_uint32), ("ts_ns", ctypes.c_uint64)]

    diffs = compare(tcpconn_btf.struct("ml_event"), Shifted)
    assert "sk: kernel @0+8, mirror @0+4" in diffs
    assert any(d.startswith("size:") for d in diffs)


def test_counter_names_fit_the_kernel_array() -> None:
    # enum ml_counter ends with ML_CNT_MAX = 16: every named counter has a slot.
    assert len(COUNTER_NAMES) <= 16
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)


def test_knob_offsets_come_from_the_opened_object() -> None:
    """l7.bpf.c has several knobs: each must sit at its own offset, as libbpf lays them out."""
    with ObjectBtf(bpf.object_path("l7")) as btf:
        layout = btf.datasec(".rodata")
    offsets = [f.offset for f in layout.fields]
    assert len(offsets) > 1 and len(set(offsets)) == len(offsets), layout
    assert layout.size >= max(f.offset + f.size for f in layout.fields)
