"""ctypes mirrors of bpf/include/tc.h (checked field by field against the compiled object's
BTF by tests/unit/test_tc_struct_mirrors.py), the counter and enum names, and pure helpers
to decode per-CPU values and log2 RTT histograms.

Sits between the kernel maps of bpf/tc.bpf.c and agent/sources/tc/source.py.
"""
from __future__ import annotations

import ctypes
import ipaddress
from typing import Dict, List, Sequence, Tuple, Type, TypeVar

T = TypeVar("T", bound=ctypes.Structure)

INGRESS, EGRESS = 0, 1
DIRECTION_NAMES: Dict[int, str] = {INGRESS: "ingress", EGRESS: "egress"}

ROLE_CLIENT, ROLE_SERVER = 0, 1
ROLE_NAMES: Dict[int, str] = {ROLE_CLIENT: "client", ROLE_SERVER: "server"}

SIDE_HOST, SIDE_POD = 0, 1
SIDE_NAMES: Dict[int, str] = {SIDE_HOST: "host", SIDE_POD: "pod"}

RTT_SLOTS = 32
DROP_REASON_MAX = 1023

# enum ml_tc_counter, in index order.
COUNTER_NAMES: List[str] = [
    "packets",
    "short_eth",
    "short_vlan",
    "vlan_too_deep",
    "short_ipv4",
    "bad_ipv4",
    "short_ipv6",
    "bad_ipv6",
    "short_ipv6_ext",
    "ipv6_ext_too_deep",
    "short_tcp",
    "bad_tcp",
    "non_ip",
    "fragments",
    "ifstats_full",
    "syns_full",
    "rtt_full",
    "drops_full",
    "syn_retransmits",
    "synack_unmatched",
    "syn_reset",
    "drops_seen",
    "ipv6_no_l4",
]
CNT_MAX = 32

# Counters that are parse failures (exported by reason); the rest are health counters.
PARSE_FAILURE_REASONS: Tuple[str, ...] = (
    "short_eth", "short_vlan", "vlan_too_deep", "short_ipv4", "bad_ipv4", "short_ipv6",
    "bad_ipv6", "short_ipv6_ext", "ipv6_ext_too_deep", "short_tcp", "bad_tcp",
)


class TcIfKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("direction", ctypes.c_uint32)]


class TcIfStats(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("segs", ctypes.c_uint64),
        ("tcp_syn", ctypes.c_uint64),
        ("tcp_synack", ctypes.c_uint64),
        ("tcp_fin", ctypes.c_uint64),
        ("tcp_rst", ctypes.c_uint64),
        ("parse_failures", ctypes.c_uint64),
    ]


class TcFlowKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
    ]


class TcSyn(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64)]


class TcRttKey(ctypes.Structure):
    _fields_ = [
        ("peer", ctypes.c_uint8 * 16),
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
    ]


class TcRttHist(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint64),
        ("sum_ns", ctypes.c_uint64),
        ("slots", ctypes.c_uint64 * RTT_SLOTS),
    ]


class TcDropKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("reason", ctypes.c_uint16),
        ("side", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]


class TcDevKey(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint32), ("ifindex", ctypes.c_uint32)]


class TcDev(ctypes.Structure):
    _fields_ = [("host_ifindex", ctypes.c_uint32), ("side", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3)]


MIRRORS: Dict[str, Type[ctypes.Structure]] = {
    "ml_tc_if_key": TcIfKey,
    "ml_tc_if_stats": TcIfStats,
    "ml_tc_flow_key": TcFlowKey,
    "ml_tc_syn": TcSyn,
    "ml_tc_rtt_key": TcRttKey,
    "ml_tc_rtt_hist": TcRttHist,
    "ml_tc_drop_key": TcDropKey,
    "ml_tc_dev_key": TcDevKey,
    "ml_tc_dev": TcDev,
}


def percpu_values(raw: bytes, struct: Type[T], ncpu: int) -> List[T]:
    """Split a per-CPU map value (each CPU's copy rounded up to 8 bytes) into structs."""
    stride = (ctypes.sizeof(struct) + 7) // 8 * 8
    return [struct.from_buffer_copy(raw[i * stride:i * stride + ctypes.sizeof(struct)]) for i in range(ncpu)]


def sum_structs(values: Sequence[ctypes.Structure], struct: Type[T]) -> T:
    """Field-wise sum of u64 fields (and u64 arrays) over CPUs."""
    out = struct()
    for name, ctype in struct._fields_:
        if name.startswith("_"):
            continue
        if isinstance(getattr(out, name), ctypes.Array):
            arr = getattr(out, name)
            for i in range(len(arr)):
                arr[i] = sum(getattr(v, name)[i] for v in values)
        else:
            setattr(out, name, sum(getattr(v, name) for v in values))
    return out


def rtt_bucket_bounds() -> List[float]:
    """Upper bounds in seconds of slots 0..RTT_SLOTS-2 (slot i holds [2^(i-1), 2^i) µs, so
    its values are < 2^i µs); the last slot is +Inf."""
    return [(2 ** i) * 1e-6 for i in range(RTT_SLOTS - 1)]


def rtt_slot(us: int) -> int:
    """The slot the kernel puts an RTT of `us` microseconds in (bit length, capped)."""
    return min(int(us).bit_length(), RTT_SLOTS - 1)


def format_addr(family: int, raw: Sequence[int]) -> str:
    data = bytes(raw)
    if family == 4:
        return str(ipaddress.IPv4Address(data[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(data[:16]))
    return ""
