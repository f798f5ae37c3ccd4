"""Names of the kernel's skb drop reasons (enum skb_drop_reason), read from the running
kernel's BTF, so tc drop counters (agent/sources/tc/source.py) are exported by name on any kernel.
The numbers differ between kernel versions; the names are what users search for.
Falls back to "reason_<n>" when BTF is not available or a number is unknown.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Dict

from meshlens.agent.kernel.libbpf import lib

BTF_KIND_ENUM = 6
BTF_KIND_ENUM64 = 19
PREFIX = "SKB_DROP_REASON_"

for _n, _r, _a in (
    ("btf__load_vmlinux_btf", ctypes.c_void_p, []),
    ("btf__free", None, [ctypes.c_void_p]),
    ("btf__find_by_name_kind", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
    ("btf__type_by_id", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_uint32]),
    ("btf__name_by_offset", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_uint32]),
):
    getattr(lib, _n).restype = _r
    getattr(lib, _n).argtypes = _a


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


def short_name(enumerator: str) -> str:
    """SKB_DROP_REASON_NETFILTER_DROP -> netfilter_drop."""
    return (enumerator[len(PREFIX):] if enumerator.startswith(PREFIX) else enumerator).lower()


@functools.lru_cache(maxsize=1)
def kernel_drop_reasons() -> Dict[int, str]:
    """{value: short name} from /sys/kernel/btf/vmlinux; {} if unavailable."""
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return {}
    try:
        tid = lib.btf__find_by_name_kind(btf, b"skb_drop_reason", BTF_KIND_ENUM)
        if tid <= 0:
            return {}
        addr = lib.btf__type_by_id(btf, tid)
        t = _BtfType.from_address(addr)
        members = (_BtfEnum * (t.info & 0xFFFF)).from_address(addr + ctypes.sizeof(_BtfType))
        return {m.val: short_name((lib.btf__name_by_offset(btf, m.name_off) or b"").decode()) for m in members}
    finally:
        lib.btf__free(btf)


def reason_name(value: int, table: Dict[int, str] | None = None) -> str:
    names = kernel_drop_reasons() if table is None else table
    return names.get(value, f"reason_{value}")
