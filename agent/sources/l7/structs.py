"""ctypes mirrors of bpf/include/l7.h (checked field by field against l7.bpf.o's BTF by
tests/unit/test_l7_structs.py), the kernel's bucket bounds and counter names.

Sits between the kernel's `http_stats` map / `l7_events` ring buffer and
agent/sources/l7/http.py / agent/sources/l7/dns.py.
"""
from __future__ import annotations

import ctypes
from typing import Dict, Tuple

ML_L7_COMM_LEN = 16
ML_PATH_MAX = 128
ML_DNS_MAX = 512
ML_DUR_BUCKETS = 15
ML_SIZE_BUCKETS = 12

# Bucket bounds, the same as the kernel's dur_bucket()/size_bucket(): bucket i of a kernel
# histogram counts observations <= bound i; the last bucket is +Inf.
DURATION_BOUNDS_S: Tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
SIZE_BOUNDS_BYTES: Tuple[float, ...] = (0.0,) + tuple(float(64 * 4 ** i) for i in range(10))
assert len(DURATION_BOUNDS_S) == ML_DUR_BUCKETS - 1
assert len(SIZE_BOUNDS_BYTES) == ML_SIZE_BUCKETS - 1

ROLE_SERVER, ROLE_CLIENT = 1, 2
ROLE_NAMES: Dict[int, str] = {ROLE_SERVER: "server", ROLE_CLIENT: "client"}

METHOD_NAMES: Dict[int, str] = {
    0: "_OTHER", 1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "HEAD", 6: "OPTIONS", 7: "PATCH",
    8: "CONNECT", 9: "TRACE",
}

EV_HTTP_REQUEST, EV_PATH, EV_DNS = 1, 2, 3
EVENT_NAMES: Dict[int, str] = {EV_HTTP_REQUEST: "http_request", EV_PATH: "path", EV_DNS: "dns"}

F_OVERFLOW, F_SAMPLE, F_REQ_SIZE, F_RESP_SIZE = 1, 2, 4, 8
DNS_QUERY, DNS_RESPONSE, DNS_ANSWERED, DNS_ASKED = 1, 2, 3, 4   # ANSWERED: paired by the kernel (packet path);
# ASKED: a query waiting in the kernel, sent only while the tap is on (packet path)

# enum ml_l7_counter, in order.
COUNTER_NAMES = [
    "events_submitted",
    "ringbuf_full",
    "stats_full",
    "conns_full",
    "args_full",
    "not_http",
    "header_too_large",
    "scan_budget",
    "bad_chunk",
    "bad_start",
    "truncated",
    "no_response",
    "unpaired_response",
    "pipeline_full",
    "upgrade",
    "http_requests",
    "dns_events",
    "dns_truncated",
    "syscalls",
    "paths_sent",
    "samples",
    "pkt_segments",
    "pkt_retransmits",
    "pkt_overlaps",
    "pkt_desync",
    "pkt_gap_in_body",
    "pkt_resync",
    "pkt_unparsed",
    "dns_queries",
    "dns_unmatched",
    "dns_pending_full",
    "dns_malformed",
    "dns_tcp_skipped",
    "pkt_fragments",
    "pkt_contended",
    "pkt_busy",
    "pkt_lock_stolen",
    "old_owners_full",
]
ML_L7_CNT_MAX = 40
# Counters that are HTTP parser give-ups (exported as meshlens_http_parse_errors_total{reason}).
PARSE_ERRORS = (
    "not_http", "header_too_large", "scan_budget", "bad_chunk", "bad_start", "truncated",
    "no_response", "unpaired_response", "pipeline_full", "upgrade", "pkt_desync",
)


class MlHttpKey(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("path_id", ctypes.c_uint32),
        ("status", ctypes.c_uint16),
        ("server_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("role", ctypes.c_uint8),
        ("method", ctypes.c_uint8),
        ("server_addr", ctypes.c_uint8 * 16),
        ("client_addr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * ML_L7_COMM_LEN),
    ]


class MlHttpVal(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint64),
        ("duration_ns_sum", ctypes.c_uint64),
        ("req_body_sum", ctypes.c_uint64),
        ("resp_body_sum", ctypes.c_uint64),
        ("req_body_count", ctypes.c_uint64),
        ("resp_body_count", ctypes.c_uint64),
        ("duration_buckets", ctypes.c_uint64 * ML_DUR_BUCKETS),
        ("req_body_buckets", ctypes.c_uint64 * ML_SIZE_BUCKETS),
        ("resp_body_buckets", ctypes.c_uint64 * ML_SIZE_BUCKETS),
    ]


class MlHttpEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("key", MlHttpKey),
        ("duration_ns", ctypes.c_uint64),
        ("req_body", ctypes.c_uint64),
        ("resp_body", ctypes.c_uint64),
        ("client_addr", ctypes.c_uint8 * 16),
        ("client_port", ctypes.c_uint16),
        ("_pad0", ctypes.c_uint8 * 6),
    ]


class MlPathEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("path_id", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("path", ctypes.c_char * ML_PATH_MAX),
    ]


class MlDnsEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("sk", ctypes.c_uint64),
        ("duration_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("server_addr", ctypes.c_uint8 * 16),
        ("server_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("dir", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 3),
        ("comm", ctypes.c_char * ML_L7_COMM_LEN),
        ("client_addr", ctypes.c_uint8 * 16),
        ("client_port", ctypes.c_uint16),
        ("_pad1", ctypes.c_uint8 * 6),
        ("payload", ctypes.c_uint8 * ML_DNS_MAX),
    ]


class L7Rodata(ctypes.Structure):
    """The `const volatile` knobs of l7.bpf.c, in .rodata order."""

    _fields_ = [("sample_every", ctypes.c_uint32), ("self_tgid", ctypes.c_uint32),
                ("have_rdonly_cast", ctypes.c_uint32)]


class L7PktRodata(ctypes.Structure):
    """The `const volatile` knobs of l7pkt.bpf.c, in .rodata order."""

    _fields_ = [("sample_every", ctypes.c_uint32), ("scan_max", ctypes.c_uint32), ("tc_chained", ctypes.c_uint32)]


class L7CgRodata(ctypes.Structure):
    """The `const volatile` knobs of l7cg.bpf.c, in .rodata order."""

    _fields_ = [("sample_every", ctypes.c_uint32), ("scan_max", ctypes.c_uint32), ("test_netns", ctypes.c_uint32)]


class MlCgSock(ctypes.Structure):
    """Value of l7cg.bpf.c's `cg_socks` (bpf_sk_storage)."""

    _fields_ = [("netns", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("comm", ctypes.c_char * 16)]


class MlPktIface(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class MlPktConnKey(ctypes.Structure):
    _fields_ = [
        ("local_addr", ctypes.c_uint8 * 16),
        ("peer_addr", ctypes.c_uint8 * 16),
        ("local_port", ctypes.c_uint16),
        ("peer_port", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]


class MlDnsPendingKey(ctypes.Structure):
    _fields_ = [("conn", MlPktConnKey), ("txid", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8)]


class MlDnsPending(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("qhash", ctypes.c_uint32), ("qlen", ctypes.c_uint16),
                ("_pad", ctypes.c_uint16)]


# Mirrors of bpf/include/l7pkt.h, checked against l7pkt.bpf.o.
PKT_MIRRORS = {"ml_pkt_iface": MlPktIface, "ml_pkt_conn_key": MlPktConnKey,
               "ml_dns_pending_key": MlDnsPendingKey, "ml_dns_pending": MlDnsPending}

MIRRORS = {
    "ml_http_key": MlHttpKey,
    "ml_http_val": MlHttpVal,
    "ml_http_event": MlHttpEvent,
    "ml_path_event": MlPathEvent,
    "ml_dns_event": MlDnsEvent,
}


def kernel_bucket(bounds: Tuple[float, ...], value: float) -> int:
    """Index of the kernel bucket a value falls in (first bound >= value; last = +Inf)."""
    for i, b in enumerate(bounds):
        if value <= b:
            return i
    return len(bounds)
