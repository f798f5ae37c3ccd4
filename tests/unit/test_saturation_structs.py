"""The saturation ctypes mirrors (agent/sources/saturation/structs.py) match
bpf/saturation.bpf.c's BTF, and the pure decoders (iterator records, port range, errno and
protocol names, addresses) read what the kernel writes. No privileges needed."""
from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.btf_layout import ObjectBtf, compare
from meshlens.agent.sources.saturation.structs import (
    CNT_MAX,
    COUNTER_NAMES,
    MIRRORS,
    REC_LISTEN,
    REC_SUMMARY,
    SatIterRec,
    errno_name,
    format_addr,
    iter_records,
    protocol_name,
)


@pytest.fixture(scope="module")
def sat_btf():
    with ObjectBtf(bpf.object_path("saturation")) as btf:
        yield btf


@pytest.mark.parametrize("struct_name", sorted(MIRRORS))
def test_saturation_mirror_matches_btf(sat_btf, struct_name: str) -> None:
    layout = sat_btf.struct(struct_name)
    assert layout.size == ctypes.sizeof(MIRRORS[struct_name])
    assert compare(layout, MIRRORS[struct_name]) == []


def test_counter_names_fit() -> None:
    assert len(COUNTER_NAMES) <= CNT_MAX
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)


def test_iter_records_split_and_ignore_a_partial_tail() -> None:
    a = SatIterRec(kind=REC_LISTEN, netns=7, port=8080, a=3, b=128, drops=41, family=4)
    b = SatIterRec(kind=REC_SUMMARY, netns=7, a=9, probes=5)
    recs = iter_records(bytes(a) + bytes(b) + b"\x01\x02\x03")
    assert [(r.kind, r.port, r.a, r.b, r.drops) for r in recs] == [(REC_LISTEN, 8080, 3, 128, 41), (REC_SUMMARY, 0, 9, 0, 0)]
    assert (recs[1].a, recs[1].probes) == (9, 5)
    assert iter_records(b"") == []


def test_names_users_search_for() -> None:
    assert errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"
    assert errno_name(errno.ETIMEDOUT) == "ETIMEDOUT"
    assert errno_name(4099) == "errno_4099"
    assert errno_name(0) == "none"
    assert protocol_name(0x0800) == "ipv4" and protocol_name(0x86DD) == "ipv6"
    assert protocol_name(0x88CC) == "0x88cc"


def test_format_addr() -> None:
    raw4 = (ctypes.c_uint8 * 16)(*socket.inet_aton("10.1.2.3"))
    assert format_addr(4, raw4) == "10.1.2.3"
    raw6 = (ctypes.c_uint8 * 16)(*socket.inet_pton(socket.AF_INET6, "fd00::7"))
    assert format_addr(6, raw6) == "fd00::7"
    assert format_addr(0, raw4) == ""
