"""ctypes mirrors of bpf/include/tcpconn.h (checked field by field against the object's BTF
by tests/unit/test_struct_mirrors.py), plus decoding helpers for addresses.

Sits between the kernel's map/ring-buffer bytes and agent/sources/tcp/source.py.
"""
from __future__ import annotations

import ctypes
import socket
from typing import Dict, Tuple

AF_INET = 2
AF_INET6 = 10

ML_COMM_LEN = 16

DIR_UNKNOWN, DIR_OUTBOUND, DIR_INBOUND = 0, 1, 2
DIRECTION_NAMES: Dict[int, str] = {DIR_UNKNOWN: "unknown", DIR_OUTBOUND: "outbound", DIR_INBOUND: "inbound"}

# enum ml_fail, in index order
FAIL_REASONS: Tuple[str, ...] = ("refused", "timeout", "unreachable", "aborted", "other")
ML_FAIL_MAX = len(FAIL_REASONS)

# Histogram bounds in ns (ML_LAT_BOUNDS_NS / ML_DUR_BOUNDS_NS in tcpconn.h)
LAT_BOUNDS_NS: Tuple[int, ...] = (
    50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
)
DUR_BOUNDS_NS: Tuple[int, ...] = (
    1_000_000, 10_000_000, 100_000_000, 500_000_000, 1_000_000_000, 5_000_000_000, 10_000_000_000,
    30_000_000_000, 60_000_000_000, 300_000_000_000, 1_800_000_000_000, 3_600_000_000_000,
)

# enum ml_delta_flags
D_OPENED, D_CLOSED, D_CONNECT, D_RTT, D_DURATION = 1, 2, 4, 8, 16

EV_OVERFLOW, EV_OPEN, EV_CLOSE, EV_CONNECT_FAIL, EV_RETRANSMIT, EV_LISTENER = range(1, 7)
EVENT_NAMES: Dict[int, str] = {
    EV_OVERFLOW: "rollup_overflow",
    EV_OPEN: "open",
    EV_CLOSE: "close",
    EV_CONNECT_FAIL: "connect_fail",
    EV_RETRANSMIT: "retransmit",
    EV_LISTENER: "listener",
}

# enum ml_counter
COUNTER_NAMES = [
    "events_submitted",
    "ringbuf_full",
    "conns_full",
    "rst_sent_nosock",
    "send_calls",
    "recv_calls",
    "state_changes",
    "retransmit_skbs",
    "rst_sent",
    "rst_received",
    "rollups_full",
    "iter_sockets",
    "adopted",
    "untracked_close",
]
ML_CNT_MAX = 16


class MlTuple(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("_pad0", ctypes.c_uint16),
    ]


class MlRollupKey(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("peer", ctypes.c_uint8 * 16),
        ("netns", ctypes.c_uint32),
        ("server_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("direction", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
        ("comm", ctypes.c_char * ML_COMM_LEN),
    ]


LAT_SLOTS = len(LAT_BOUNDS_NS) + 1
DUR_SLOTS = len(DUR_BOUNDS_NS) + 1


class MlRollup(ctypes.Structure):
    _fields_ = [
        ("opened", ctypes.c_uint64),
        ("closed", ctypes.c_uint64),
        ("active", ctypes.c_int64),
        ("failed", ctypes.c_uint64 * ML_FAIL_MAX),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("segs_retrans", ctypes.c_uint64),
        ("rsts_sent", ctypes.c_uint64),
        ("rsts_received", ctypes.c_uint64),
        ("connect_ns_sum", ctypes.c_uint64),
        ("rtt_us_sum", ctypes.c_uint64),
        ("duration_ns_sum", ctypes.c_uint64),
        ("connect_hist", ctypes.c_uint64 * LAT_SLOTS),
        ("rtt_hist", ctypes.c_uint64 * LAT_SLOTS),
        ("duration_hist", ctypes.c_uint64 * DUR_SLOTS),
    ]


# Positions in a rollup read as one array of u64 (every field is 8 bytes).
ROLLUP_WORDS = ctypes.sizeof(MlRollup) // 8
R_OPENED, R_CLOSED, R_ACTIVE = 0, 1, 2
R_FAILED = 3
R_BYTES_SENT = R_FAILED + ML_FAIL_MAX
R_BYTES_RECEIVED, R_SEGS_RETRANS, R_RSTS_SENT, R_RSTS_RECEIVED = (R_BYTES_SENT + i for i in range(1, 5))
R_CONNECT_SUM, R_RTT_SUM, R_DURATION_SUM = R_BYTES_SENT + 5, R_BYTES_SENT + 6, R_BYTES_SENT + 7
R_CONNECT_HIST = R_BYTES_SENT + 8
R_RTT_HIST = R_CONNECT_HIST + LAT_SLOTS
R_DURATION_HIST = R_RTT_HIST + LAT_SLOTS


class MlDelta(ctypes.Structure):
    _fields_ = [
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("connect_ns", ctypes.c_uint64),
        ("duration_ns", ctypes.c_uint64),
        ("rtt_us", ctypes.c_uint32),
        ("segs_retrans", ctypes.c_uint32),
        ("rsts_sent", ctypes.c_uint32),
        ("rsts_received", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("fail", ctypes.c_uint8),
        ("active", ctypes.c_int8),
        ("_pad", ctypes.c_uint8 * 4),
    ]


class MlConn(ctypes.Structure):
    _fields_ = [
        ("key", MlRollupKey),
        ("tuple", MlTuple),
        ("start_ns", ctypes.c_uint64),
        ("established_ns", ctypes.c_uint64),
        ("acked", ctypes.c_uint64),
        ("received", ctypes.c_uint64),
        ("base_acked", ctypes.c_uint64),
        ("base_received", ctypes.c_uint64),
        ("retrans", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class MlListenerKey(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint32), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


class MlListener(ctypes.Structure):
    _fields_ = [("comm", ctypes.c_char * ML_COMM_LEN), ("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class MlEvent(ctypes.Structure):
    _fields_ = [
        ("sk", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("err", ctypes.c_int32),
        ("tuple", MlTuple),
        ("key", MlRollupKey),
        ("delta", MlDelta),
        ("total_sent", ctypes.c_uint64),
        ("total_received", ctypes.c_uint64),
        ("duration_ns", ctypes.c_uint64),
        ("segs", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("inode", ctypes.c_uint64),
    ]


class MlSettings(ctypes.Structure):
    _fields_ = [("follow", ctypes.c_uint32), ("wake_bytes", ctypes.c_uint32)]


class TcpconnRodata(ctypes.Structure):
    """The `const volatile` knobs of tcpconn.bpf.c, in .rodata order."""

    _fields_ = [("emit_retransmit_events", ctypes.c_uint8), ("bytes_per_call", ctypes.c_uint8)]


MIRRORS = {
    "ml_tuple": MlTuple, "ml_rollup_key": MlRollupKey, "ml_rollup": MlRollup, "ml_delta": MlDelta,
    "ml_conn": MlConn, "ml_listener_key": MlListenerKey, "ml_listener": MlListener, "ml_event": MlEvent,
    "ml_settings": MlSettings,
}


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_ADDR_CACHE: Dict[Tuple[int, bytes], str] = {}
_ADDR_CACHE_MAX = 65536


def format_addr(family: int, raw: "bytes | ctypes.Array[ctypes.c_uint8]") -> str:
    """Address bytes (network order) as text; IPv4-mapped IPv6 shown as IPv4. Cached: the
    same peers recur in almost every record."""
    b = bytes(raw)
    key = (family, b)
    text = _ADDR_CACHE.get(key)
    if text is not None:
        return text
    if family == AF_INET:
        text = socket.inet_ntop(socket.AF_INET, b[:4])
    elif family == AF_INET6:
        text = (socket.inet_ntop(socket.AF_INET, b[12:16]) if b[:12] == _V4_MAPPED
                else socket.inet_ntop(socket.AF_INET6, b[:16]))
    else:
        text = ""
    if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
        _ADDR_CACHE.clear()
    _ADDR_CACHE[key] = text
    return text
