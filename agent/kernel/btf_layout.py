"""Struct layouts read from a compiled BPF object's BTF (via libbpf's btf__* API).

Used to prove that the ctypes mirrors in agent/*_structs.py match what clang compiled for
the kernel side (DESIGN.md decision 4), field by field, without privileges.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Type

from meshlens.agent.kernel.libbpf import get_errno, lib

BTF_KIND_STRUCT = 4
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


for _n, _r, _a in (
    ("btf__parse_elf", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]),
    ("btf__free", None, [ctypes.c_void_p]),
    ("btf__find_by_name_kind", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
    ("btf__type_by_id", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_uint32]),
    ("btf__name_by_offset", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_uint32]),
    ("btf__resolve_size", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_uint32]),
):
    getattr(lib, _n).restype = _r
    getattr(lib, _n).argtypes = _a


@dataclass(frozen=True)
class Field:
    name: str
    offset: int  # bytes
    size: int


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    fields: List[Field]


class ObjectBtf:
    """BTF of a compiled object as libbpf sees it after opening (not loading) it: clang
    leaves data-section sizes and variable offsets at 0 and libbpf fills them in at open, so
    the raw ELF BTF would place every knob at offset 0."""

    def __init__(self, path: Path) -> None:
        from meshlens.agent.kernel.bpf import BpfObject  # local: bpf imports nothing from here

        self._obj = BpfObject(path)
        self._btf = self._obj.btf_ptr()
        if not self._btf:
            self._obj.close()
            raise OSError(get_errno(), f"no BTF in {path}")

    def close(self) -> None:
        if self._btf:
            self._btf = None
            self._obj.close()

    def __enter__(self) -> "ObjectBtf":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _name(self, off: int) -> str:
        return (lib.btf__name_by_offset(self._btf, off) or b"").decode()

    def struct(self, name: str) -> Layout:
        tid = lib.btf__find_by_name_kind(self._btf, name.encode(), BTF_KIND_STRUCT)
        if tid <= 0:
            raise KeyError(f"struct {name} not in BTF")
        t = _BtfType.from_address(lib.btf__type_by_id(self._btf, tid))
        vlen = t.info & 0xFFFF
        members = (_BtfMember * vlen).from_address(lib.btf__type_by_id(self._btf, tid) + ctypes.sizeof(_BtfType))
        fields = [
            Field(self._name(m.name_off), (m.offset & 0xFFFFFF if t.info >> 31 else m.offset) // 8,
                  int(lib.btf__resolve_size(self._btf, m.type)))
            for m in members
        ]
        return Layout(name, t.size_or_type, fields)

    def datasec(self, name: str) -> Layout:
        """Variables of a data section such as .rodata (the knobs), as a layout."""
        tid = lib.btf__find_by_name_kind(self._btf, name.encode(), BTF_KIND_DATASEC)
        if tid <= 0:
            raise KeyError(f"datasec {name} not in BTF")
        addr = lib.btf__type_by_id(self._btf, tid)
        t = _BtfType.from_address(addr)
        infos = (_BtfVarSecinfo * (t.info & 0xFFFF)).from_address(addr + ctypes.sizeof(_BtfType))
        fields = [Field(self._name(_BtfType.from_address(lib.btf__type_by_id(self._btf, i.type)).name_off), i.offset, i.size)
                  for i in infos]
        return Layout(name, t.size_or_type, fields)


def ctypes_layout(struct: Type[ctypes.Structure]) -> Layout:
    return Layout(
        struct.__name__,
        ctypes.sizeof(struct),
        [Field(name, getattr(struct, name).offset, getattr(struct, name).size) for name, *_ in struct._fields_],
    )


def compare(btf_layout: Layout, mirror: Type[ctypes.Structure]) -> List[str]:
    """Differences between a BTF layout and a ctypes mirror (empty when they match)."""
    py = ctypes_layout(mirror)
    diffs = []
    if btf_layout.size != py.size:
        diffs.append(f"size: kernel {btf_layout.size}, mirror {py.size}")
    kernel = {f.name: f for f in btf_layout.fields}
    mirror_f: Dict[str, Field] = {f.name: f for f in py.fields}
    for name in sorted(set(kernel) | set(mirror_f)):
        k, m = kernel.get(name), mirror_f.get(name)
        if k is None or m is None:
            diffs.append(f"{name}: only in {'mirror' if k is None else 'kernel'}")
        elif (k.offset, k.size) != (m.offset, m.size):
            diffs.append(f"{name}: kernel @{k.offset}+{k.size}, mirror @{m.offset}+{m.size}")
    return diffs
