"""ctypes mirrors of bpf/include/saturation.h (checked against the compiled object's BTF by
tests/unit/test_saturation_structs.py), the counter and enum names, and pure decoders for the
iterator's records and the label values (protocol, errno, event kind).

Sits between the kernel maps and records of bpf/saturation.bpf.c and
agent/sources/saturation/source.py.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
from typing import Dict, List

REASON_MAX = 1023

RCVBUF_DROP, RCVQUEUE_FULL, BUF_LIMIT, SOCK_ERROR, PORT_EXHAUSTED = 0, 1, 2, 3, 4
KIND_NAMES: Dict[int, str] = {
    RCVBUF_DROP: "rcvbuf_drop", RCVQUEUE_FULL: "rcvqueue_full", BUF_LIMIT: "exceed_buf_limit",
    SOCK_ERROR: "error", PORT_EXHAUSTED: "port_exhausted",
}
BUF_LIMIT_NAMES: Dict[int, str] = {0: "send", 1: "receive"}

REC_LISTEN, REC_ZEROWIN, REC_SUMMARY = 1, 2, 3
ZW_LOCAL, ZW_PEER = 1, 2

# enum ml_sat_counter, in index order.
COUNTER_NAMES: List[str] = [
    "drops_seen", "drops_full", "events_full", "rcvqueue_full", "buf_limit", "errors",
    "port_exhausted", "iter_sockets", "iter_write_failed",
]
CNT_MAX = 16

PROTOCOL_NAMES: Dict[int, str] = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x8100: "vlan", 0: "none"}


class SatDropKey(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("netns", ctypes.c_uint32), ("protocol", ctypes.c_uint16),
                ("reason", ctypes.c_uint16)]


class SatSockKey(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("peer", ctypes.c_uint8 * 16), ("netns", ctypes.c_uint32),
                ("detail", ctypes.c_uint32), ("kind", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8 * 6)]


class SatIterRec(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("drops", ctypes.c_uint64), ("addr", ctypes.c_uint8 * 16),
                ("netns", ctypes.c_uint32), ("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32),
                ("probes", ctypes.c_uint32), ("port", ctypes.c_uint16), ("kind", ctypes.c_uint8),
                ("family", ctypes.c_uint8)]


class SatIterCfg(ctypes.Structure):
    _fields_ = [("port_low", ctypes.c_uint32), ("port_high", ctypes.c_uint32)]


MIRRORS = {"ml_sat_drop_key": SatDropKey, "ml_sat_sock_key": SatSockKey, "ml_sat_iter_rec": SatIterRec,
           "ml_sat_iter_cfg": SatIterCfg}


def protocol_name(value: int) -> str:
    return PROTOCOL_NAMES.get(value, f"0x{value:04x}")


def errno_name(value: int) -> str:
    """111 -> ECONNREFUSED (the name users search for); unknown numbers stay numeric; 0 (a
    report whose error was already cleared when the tracepoint read it) is "none"."""
    if value == 0:
        return "none"
    return errno.errorcode.get(value, f"errno_{value}")


def iter_records(data: bytes) -> List[SatIterRec]:
    """Split the iterator's output into records; a trailing partial record is ignored."""
    size = ctypes.sizeof(SatIterRec)
    return [SatIterRec.from_buffer_copy(data, off) for off in range(0, len(data) - size + 1, size)]


def format_addr(family: int, raw) -> str:
    """Address bytes of a key or record as text ("" when the family is unknown)."""
    data = bytes(raw)
    if family == 4:
        return str(ipaddress.IPv4Address(data[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(data[:16]))
    return ""
