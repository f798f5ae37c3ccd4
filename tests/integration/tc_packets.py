"""Crafted Ethernet frames for BPF_PROG_TEST_RUN of bpf/tc.bpf.c: Ethernet with up to any
number of VLAN tags, IPv4 (options, fragments), IPv6 (extension headers, fragments), TCP
(flags, options) and UDP. Checksums are left zero: the programs do not verify them.

Each builder returns bytes plus, where a test needs it, the offset where each layer starts,
so truncation tests know which layer a cut falls in.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
HOP, ROUTING, FRAGMENT, ESP, AH, NONE, DSTOPTS = 0, 43, 44, 50, 51, 59, 60
TCP, UDP = 6, 17

MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


@dataclass
class Frame:
    data: bytes
    layers: List[Tuple[str, int]] = field(default_factory=list)  # (layer, start offset)

    def __len__(self) -> int:
        return len(self.data)

    def layer_at(self, offset: int) -> str:
        """The layer a byte offset belongs to (the last layer starting at or before it)."""
        name = self.layers[0][0]
        for layer, start in self.layers:
            if start <= offset:
                name = layer
        return name


def tcp_header(sport: int, dport: int, flags: int, options: bytes = b"", doff: int | None = None) -> bytes:
    if len(options) % 4:
        options += b"\x01" * (4 - len(options) % 4)  # NOP padding
    words = doff if doff is not None else 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0 if not flags & ACK else 2000,
                       words << 4, flags, 65535, 0, 0) + options


def udp_header(sport: int, dport: int, payload_len: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + payload_len, 0)


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, *, options: bytes = b"",
                frag_offset: int = 0, more_fragments: bool = False, ihl: int | None = None,
                version: int = 4, tot_len: int | None = None) -> bytes:
    hl = ihl if ihl is not None else 5 + len(options) // 4
    total = tot_len if tot_len is not None else 20 + len(options) + payload_len
    frag = (frag_offset & 0x1FFF) | (0x2000 if more_fragments else 0)
    return struct.pack("!BBHHHBBH4s4s", (version << 4) | hl, 0, total, 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + options


def ipv6_header(src: str, dst: str, nexthdr: int, payload_len: int, version: int = 6) -> bytes:
    return struct.pack("!IHBB16s16s", version << 28, payload_len, nexthdr, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)


def ipv6_ext(kind: int, nexthdr: int, *, length_units: int = 0, frag_offset: int = 0, more: bool = False) -> bytes:
    """One extension header. HOP/ROUTING/DSTOPTS: (length_units+1)*8 bytes; AH:
    (length_units+2)*4 bytes; FRAGMENT: 8 bytes with the given offset (8-byte units)."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", nexthdr, 0, (frag_offset << 3) | int(more), 0xABCD)
    if kind == AH:
        size = (length_units + 2) * 4
    else:
        size = (length_units + 1) * 8
    return bytes([nexthdr, length_units]) + b"\x00" * (size - 2)


def ethernet(ethertype: int, vlans: Sequence[Tuple[int, int]] = ()) -> bytes:
    """Ethernet header; vlans = [(tpid, vid), ...] outermost first."""
    if not vlans:
        return MAC_A + MAC_B + struct.pack("!H", ethertype)
    out = MAC_A + MAC_B + struct.pack("!H", vlans[0][0])
    for i, (_tpid, vid) in enumerate(vlans):
        inner = vlans[i + 1][0] if i + 1 < len(vlans) else ethertype
        out += struct.pack("!HH", vid & 0x0FFF, inner)
    return out


def tcp4(src: str = "10.0.0.1", dst: str = "10.0.0.2", sport: int = 40000, dport: int = 80, flags: int = SYN,
         *, vlans: Sequence[Tuple[int, int]] = (), ip_options: bytes = b"", tcp_options: bytes = b"",
         payload: bytes = b"", more_fragments: bool = False) -> Frame:
    eth = ethernet(ETH_P_IP, vlans)
    th = tcp_header(sport, dport, flags, tcp_options)
    ip = ipv4_header(src, dst, TCP, len(th) + len(payload), options=ip_options, more_fragments=more_fragments)
    layers = [("eth", 0)]
    if vlans:
        layers.append(("vlan", 14))
    layers += [("ipv4", len(eth)), ("tcp", len(eth) + len(ip)), ("payload", len(eth) + len(ip) + len(th))]
    return Frame(eth + ip + th + payload, layers)


def tcp6(src: str = "fd00::1", dst: str = "fd00::2", sport: int = 40000, dport: int = 80, flags: int = SYN,
         *, vlans: Sequence[Tuple[int, int]] = (), exts: Sequence[Tuple[int, dict]] = (),
         payload: bytes = b"") -> Frame:
    """IPv6/TCP with extension headers exts = [(kind, kwargs), ...] in order."""
    eth = ethernet(ETH_P_IPV6, vlans)
    th = tcp_header(sport, dport, flags)
    chain = b""
    kinds = [k for k, _ in exts]
    for i, (kind, kw) in enumerate(exts):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else TCP
        chain += ipv6_ext(kind, nxt, **kw)
    ip = ipv6_header(src, dst, kinds[0] if kinds else TCP, len(chain) + len(th) + len(payload))
    layers = [("eth", 0)]
    if vlans:
        layers.append(("vlan", 14))
    layers.append(("ipv6", len(eth)))
    if exts:
        layers.append(("ipv6_ext", len(eth) + 40))
    layers += [("tcp", len(eth) + 40 + len(chain)), ("payload", len(eth) + 40 + len(chain) + len(th))]
    return Frame(eth + ip + chain + th + payload, layers)


def udp4(payload_len: int, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> Frame:
    eth = ethernet(ETH_P_IP)
    ip = ipv4_header(src, dst, UDP, 8 + payload_len)
    return Frame(eth + ip + udp_header(5000, 53, payload_len) + b"x" * payload_len, [("eth", 0)])
