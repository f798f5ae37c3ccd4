"""DNS wire parsing: real messages, compression, and hostile input (never raises)."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.agent.sources.l7.dns_wire import parse, read_name


def query(name: str, qtype: int = 1, txid: int = 0x1234, flags: int = 0x0100, an: int = 0) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack("!HHHHHH", txid, flags, 1, an, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def test_query_and_response() -> None:
    q = parse(query("Web.Example.test", 28))
    assert q and q.txid == 0x1234 and not q.is_response and q.qname == "web.example.test." and q.qtype_name == "AAAA"
    r = parse(query("x.test", 1, flags=0x8183, an=0))
    assert r and r.is_response and r.rcode_name == "NXDomain"


def test_compression_pointer_and_loops() -> None:
    msg = query("a.test") + b"\xc0\x0c"
    assert read_name(msg, len(msg) - 2) == ("a.test.", len(msg))
    loop = b"\x00" * 12 + b"\xc0\x0c"
    assert read_name(loop, 12) is None                    # pointer to itself: bounded


def test_truncated_is_none() -> None:
    full = query("abc.test")
    assert all(parse(full[:n]) is None for n in range(0, len(full)))
    assert parse(full) is not None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises(data: bytes) -> None:
    parse(data)
