"""The packet path's DNS records for the flow stream, on crafted frames (BPF_PROG_TEST_RUN):
queries go to user space (ML_DNS_ASKED) only while the tap switch is on, every DNS record
carries the pod's address and port, and the records' `sk` is what user space computes from a
dns_pending key (agent/sources/l7/dns.conn_key_hash), which is how a timed-out query is named."""
from __future__ import annotations

import ctypes

from meshlens.agent.sources.l7.dns import conn_key_hash
from meshlens.agent.sources.l7.dns_wire import parse
from meshlens.agent.sources.l7.structs import DNS_ANSWERED, DNS_ASKED, MlPktConnKey
from meshlens.agent.sources.tcp.structs import format_addr
from tests.integration.test_l7pkt_prog_run import (PEER, POD, Harness, dns_answers, dns_msg, h,  # noqa: F401
                                                   harness, udp)


def tap(h: Harness, on: bool) -> None:
    h.obj.map("tap_ctl").update_raw((0).to_bytes(4, "little"), (1 if on else 0).to_bytes(4, "little"))


def test_queries_reach_user_space_only_while_the_tap_is_on(h: Harness) -> None:
    dns_answers(h)
    try:
        tap(h, False)
        h.run(h.out, udp(POD, PEER, 40101, 53, dns_msg(0x0101, "quiet.test", 1)))
        assert dns_answers(h) == []                    # nobody follows: the kernel pairs alone
        tap(h, True)
        q = dns_msg(0x0202, "asked.test", 28)
        h.run(h.out, udp(POD, PEER, 40202, 53, q))
        [asked] = dns_answers(h)
        assert asked.dir == DNS_ASKED and asked.duration_ns == 0
        msg = parse(bytes(asked.payload)[: asked.len])
        assert msg is not None and (msg.txid, msg.qname, msg.qtype, msg.is_response) == (0x0202, "asked.test.", 28, False)
        assert (format_addr(asked.family, asked.client_addr), asked.client_port) == (POD, 40202)
        assert (format_addr(asked.family, asked.server_addr), asked.server_port) == (PEER, 53)
        # the waiting entry's key hashes, in user space, to the record's sk (with its txid)
        keys = [k for k in h.obj.map("dns_pending").keys_raw()
                if MlPktConnKey.from_buffer_copy(k[: ctypes.sizeof(MlPktConnKey)]).local_port == 40202]
        assert len(keys) == 1
        n = ctypes.sizeof(MlPktConnKey)
        assert conn_key_hash(keys[0][:n]) == asked.sk and int.from_bytes(keys[0][n:n + 2], "little") == 0x0202
        # its answer: paired, with the same sk and the pod's end
        h.run(h.into, udp(PEER, POD, 53, 40202, dns_msg(0x0202, "asked.test", 28, True)))
        [ans] = dns_answers(h)
        assert ans.dir == DNS_ANSWERED and ans.sk == asked.sk and ans.duration_ns > 0
        assert (format_addr(ans.family, ans.client_addr), ans.client_port) == (POD, 40202)
    finally:
        tap(h, False)
