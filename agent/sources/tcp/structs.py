"""ctypes mirrors of bpf/include/tcpconn.h (checked field by field against the object's BTF
by tests/unit/test_struct_mirrors.py), plus decoding helpers for addresses.

Sits between the kernel's ring-buffer/map bytes and agent/sources/tcp/source.py.
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

EV_OPEN, EV_CLOSE, EV_CONNECT_FAIL, EV_RETRANSMIT, EV_BYTES, EV_RESET, EV_SYNACK_RETRANSMIT = range(1, 8)
EVENT_NAMES: Dict[int, str] = {
    EV_OPEN: "open",
    EV_CLOSE: "close",
    EV_CONNECT_FAIL: "connect_fail",
    EV_RETRANSMIT: "retransmit",
    EV_BYTES: "bytes_overflow",
    EV_RESET: "reset",
    EV_SYNACK_RETRANSMIT: "synack_retransmit",
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


class MlConn(ctypes.Structure):
    _fields_ = [
        ("tuple", MlTuple),
        ("start_ns", ctypes.c_uint64),
        ("established_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("segs_retrans", ctypes.c_uint32),
        ("rsts_sent", ctypes.c_uint32),
        ("rsts_received", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("direction", ctypes.c_uint8),
        ("_pad1", ctypes.c_uint8 * 7),
        ("comm", ctypes.c_char * ML_COMM_LEN),
    ]


class MlEvent(ctypes.Structure):
    _fields_ = [
        ("sk", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
        ("conn", MlConn),
        ("type", ctypes.c_uint32),
        ("err", ctypes.c_int32),
        ("segs", ctypes.c_uint32),
        ("rst_sent", ctypes.c_uint8),
        ("_pad2", ctypes.c_uint8 * 3),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
    ]


class TcpconnRodata(ctypes.Structure):
    """The `const volatile` knobs of tcpconn.bpf.c, in .rodata order."""

    _fields_ = [("emit_retransmit_events", ctypes.c_uint8), ("emit_open_events", ctypes.c_uint8)]


MIRRORS = {"ml_tuple": MlTuple, "ml_conn": MlConn, "ml_event": MlEvent}


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
