"""DNS wire format, the few fields meshlens needs: id, QR, rcode, counts, first question.

Input is the first bytes of a UDP payload copied by the kernel (l7.bpf.c, ML_EV_DNS), so it may
be truncated or hostile: every read is bounds-checked, compression pointers are followed a
bounded number of times, and failures return None (the caller counts them). Used by
agent/sources/l7/dns.py.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Tuple

QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY",
}
RCODE_NAMES = {
    0: "NoError", 1: "FormErr", 2: "ServFail", 3: "NXDomain", 4: "NotImp", 5: "Refused",
    6: "YXDomain", 7: "YXRRSet", 8: "NXRRSet", 9: "NotAuth", 10: "NotZone",
}
MAX_NAME = 255
MAX_POINTERS = 16


@dataclass(frozen=True)
class DnsMessage:
    txid: int
    is_response: bool
    opcode: int
    rcode: int
    qdcount: int
    ancount: int
    qname: str
    qtype: int

    @property
    def qtype_name(self) -> str:
        return QTYPE_NAMES.get(self.qtype, str(self.qtype))

    @property
    def rcode_name(self) -> str:
        return RCODE_NAMES.get(self.rcode, str(self.rcode))


def read_name(msg: bytes, off: int) -> Optional[Tuple[str, int]]:
    """Decode a (possibly compressed) name at off: (name, offset after it) or None."""
    labels = []
    total = 0
    end: Optional[int] = None
    jumps = 0
    while True:
        if off >= len(msg):
            return None
        n = msg[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg) or jumps >= MAX_POINTERS:
                return None
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            continue
        if n & 0xC0:
            return None  # reserved label types
        label = msg[off + 1: off + 1 + n]
        if len(label) != n:
            return None
        total += n + 1
        if total > MAX_NAME:
            return None
        labels.append(label.decode("ascii", "replace").lower())
        off += 1 + n
    return ".".join(labels) + ".", (end if end is not None else off)


def parse(msg: bytes) -> Optional[DnsMessage]:
    """Parse header and first question; None if it is not a plausible DNS message."""
    if len(msg) < 12:
        return None
    txid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg, 0)
    opcode = (flags >> 11) & 0xF
    if opcode > 6:
        return None
    qname, qtype = "", 0
    if qd:
        got = read_name(msg, 12)
        if got is None:
            return None
        qname, off = got
        if off + 4 > len(msg):
            return None
        qtype, _qclass = struct.unpack_from("!HH", msg, off)
    return DnsMessage(
        txid=txid, is_response=bool(flags & 0x8000), opcode=opcode, rcode=flags & 0xF,
        qdcount=qd, ancount=an, qname=qname, qtype=qtype,
    )
