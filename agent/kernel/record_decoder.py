"""Fast decoding of ring-buffer records: one precompiled struct.unpack_from per record type,
derived from its ctypes mirror (which tests check against the object's BTF), so the layout
is still defined once. Reading fields through ctypes attributes costs microseconds per field;
this turns a record into a flat tuple in one call.
"""
from __future__ import annotations

import ctypes
import struct
from typing import Dict, List, Tuple, Type

_CODES = {
    ctypes.c_uint8: "B", ctypes.c_int8: "b", ctypes.c_uint16: "H", ctypes.c_int16: "h",
    ctypes.c_uint32: "I", ctypes.c_int32: "i", ctypes.c_uint64: "Q", ctypes.c_int64: "q",
    ctypes.c_char: "c",
}


def _flatten(ctype: Type[ctypes.Structure], prefix: str, out_fmt: List[str], out_names: List[str]) -> None:
    pos = 0
    for name, ftype, *_ in ctype._fields_:
        field = getattr(ctype, name)
        if field.offset > pos:  # implicit padding would be a bug in the mirror; tolerate it here
            out_fmt.append(f"{field.offset - pos}x")
        full = prefix + name
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            _flatten(ftype, full + ".", out_fmt, out_names)
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            out_fmt.append(f"{ctypes.sizeof(ftype)}s")  # arrays (addresses, names) as bytes
            out_names.append(full)
        else:
            out_fmt.append(_CODES[ftype])
            out_names.append(full)
        pos = field.offset + field.size
    if ctypes.sizeof(ctype) > pos:
        out_fmt.append(f"{ctypes.sizeof(ctype) - pos}x")


class RecordDecoder:
    """decoder.unpack(raw) -> tuple; decoder.index['conn.tuple.sport'] -> position in it."""

    def __init__(self, ctype: Type[ctypes.Structure]) -> None:
        fmt: List[str] = []
        names: List[str] = []
        _flatten(ctype, "", fmt, names)
        self.struct = struct.Struct("<" + "".join(fmt))
        if self.struct.size != ctypes.sizeof(ctype):
            raise ValueError(f"{ctype.__name__}: struct size {self.struct.size} != ctypes {ctypes.sizeof(ctype)}")
        self.names: Tuple[str, ...] = tuple(names)
        self.index: Dict[str, int] = {n: i for i, n in enumerate(names)}
        self.size = self.struct.size

    def unpack(self, raw: bytes, offset: int = 0) -> tuple:
        return self.struct.unpack_from(raw, offset)
