"""L4 source: loads bpf/tcpconn.bpf.c, turns its events and map sweeps into the flow table.

kernel `conns` map + `events` ring buffer -> (this module) -> agent/flows.FlowTable ->
snapshot for the exporter (exporter/tcp_metrics.py). Also reports the kernel's own drop
counters so nothing is lost silently.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from . import bpf
from .attach import Signal, Variant, load_with_fallback
from .flows import ConnFacts, FlowSnapshot, FlowTable
from .kernel_features import KernelFeatures
from .source import AttachChoice, Source, SourceHealth
from .tcpconn_structs import (
    COUNTER_NAMES,
    DIRECTION_NAMES,
    EV_BYTES,
    EV_CLOSE,
    EV_CONNECT_FAIL,
    EV_OPEN,
    EV_RESET,
    EV_RETRANSMIT,
    EV_SYNACK_RETRANSMIT,
    EVENT_NAMES,
    MlConn,
    MlEvent,
    TcpconnRodata,
    format_addr,
)

log = logging.getLogger("meshlens.tcp")

SIGNALS = (
    Signal("tcp_state", (Variant("tracepoint", "tracepoint", ("handle_set_state",), ("sock/inet_sock_set_state",)),)),
    Signal(
        "tcp_bytes",
        (
            Variant("fentry", "fentry", ("fexit_tcp_sendmsg", "fentry_tcp_cleanup_rbuf"), ("tcp_sendmsg", "tcp_cleanup_rbuf")),
            Variant(
                "tracepoint", "tracepoint", ("handle_send_length", "handle_recv_length"),
                ("sock/sock_send_length", "sock/sock_recv_length"),
            ),
        ),
    ),
    Signal(
        "tcp_retransmit",
        (Variant("tracepoint", "tracepoint", ("handle_retransmit",), ("tcp/tcp_retransmit_skb",)),),
    ),
    Signal(
        "tcp_synack_retransmit",
        (Variant("tracepoint", "tracepoint", ("handle_retransmit_synack",), ("tcp/tcp_retransmit_synack",)),),
        required=False,
    ),
    Signal(
        "tcp_reset",
        (
            Variant(
                "tracepoint", "tracepoint", ("handle_send_reset", "handle_receive_reset"),
                ("tcp/tcp_send_reset", "tcp/tcp_receive_reset"),
            ),
        ),
    ),
)

CONNECT_FAIL_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    0: "aborted",
}


@dataclass(frozen=True)
class TcpConfig:
    conns_max_entries: int = 65536
    ringbuf_bytes: int = 4 << 20
    emit_retransmit_events: bool = True
    max_rollups: int = 10_000
    rollup_ttl_s: float = 600.0


def facts_from(sk: int, c: MlConn) -> ConnFacts:
    fam = c.tuple.family
    return ConnFacts(
        sk=sk,
        start_ns=c.start_ns,
        direction=DIRECTION_NAMES.get(c.direction, "unknown"),
        process=c.comm.decode("utf-8", "replace"),
        pid=c.pid,
        cgroup_id=c.cgroup_id,
        netns=c.netns,
        local_address=format_addr(fam, c.tuple.saddr),
        local_port=c.tuple.sport,
        peer_address=format_addr(fam, c.tuple.daddr),
        peer_port=c.tuple.dport,
        bytes_sent=c.bytes_sent,
        bytes_received=c.bytes_received,
        segs_retrans=c.segs_retrans,
        rsts_sent=c.rsts_sent,
        rsts_received=c.rsts_received,
        established_ns=c.established_ns,
        srtt_us=c.srtt_us,
    )


class TcpSource(Source):
    name = "tcp"

    def __init__(self, config: TcpConfig = TcpConfig(), features: Optional[KernelFeatures] = None,
                 clock=time.monotonic) -> None:
        self.config = config
        self.features = features or KernelFeatures.probe()
        self.flows = FlowTable(config.max_rollups, config.rollup_ttl_s, clock)
        self.obj: Optional[bpf.BpfObject] = None
        self._rb: Optional[bpf.RingBuffer] = None
        self._choices: List[AttachChoice] = []
        self.events_read: Dict[str, int] = {n: 0 for n in EVENT_NAMES.values()}
        self.decode_errors = 0
        self.close_events_lost_recovered = 0
        self._map_entries = 0
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        obj.map("conns").max_entries = self.config.conns_max_entries
        obj.map("events").max_entries = self.config.ringbuf_bytes
        obj.set_rodata({"emit_retransmit_events": int(self.config.emit_retransmit_events)}, TcpconnRodata)

    def start(self) -> None:
        self.obj, self._choices = load_with_fallback(
            bpf.object_path("tcpconn"), SIGNALS, self.features, self._configure
        )
        self._rb = bpf.RingBuffer(self.obj.map("events"), self._on_event)
        for ch in self._choices:
            log.info("tcp: %s via %s (%s)", ch.signal, ch.chosen, ", ".join(ch.programs))

    def stop(self) -> None:
        if self._rb:
            self._rb.free()
            self._rb = None
        if self.obj:
            self.obj.close()
            self.obj = None

    def ring_buffers(self) -> List[bpf.RingBuffer]:
        return [self._rb] if self._rb else []

    def attach_report(self) -> List[AttachChoice]:
        return list(self._choices)

    # ---- events --------------------------------------------------------------------------
    def _on_event(self, data: bytes) -> None:
        if len(data) < ctypes.sizeof(MlEvent):
            self.decode_errors += 1
            return
        ev = MlEvent.from_buffer_copy(data)
        name = EVENT_NAMES.get(ev.type)
        if name is None:
            self.decode_errors += 1
            return
        self.events_read[name] += 1
        f = facts_from(ev.sk, ev.conn)
        if ev.type == EV_OPEN:
            lat = None
            if f.direction == "outbound" and ev.conn.established_ns and ev.conn.start_ns:
                lat = (ev.conn.established_ns - ev.conn.start_ns) / 1e9
            self.flows.opened(f, lat)
        elif ev.type == EV_CLOSE:
            self.flows.closed(f, max(0, ev.ts_ns - ev.conn.start_ns) / 1e9)
        elif ev.type == EV_CONNECT_FAIL:
            self.flows.connect_failed(f, CONNECT_FAIL_REASONS.get(ev.err, "other"))
        elif ev.type == EV_BYTES:
            self.flows.add_unowned(f, bytes_sent=ev.bytes_sent, bytes_received=ev.bytes_received)
        elif ev.type == EV_RESET:
            self.flows.add_unowned(f, **({"rsts_sent": 1} if ev.rst_sent else {"rsts_received": 1}))
        elif ev.type == EV_SYNACK_RETRANSMIT:
            self.flows.add_unowned(f, segs_retrans=ev.segs)
        elif ev.type == EV_RETRANSMIT:
            pass  # counts come from total_retrans in the map; the event feeds the live tap later

    # ---- sweeps --------------------------------------------------------------------------
    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        read_ns = time.monotonic_ns()
        items = self.obj.map("conns").items(ctypes.c_uint64, MlConn)
        self._map_entries = len(items)
        alive = set()
        for sk, c in items:
            f = facts_from(sk, c)
            alive.add((sk, c.start_ns))
            self.flows.update(f)
        # Close events are submitted before the kernel deletes the entry: draining the ring
        # buffer now credits every connection missing from `items` before it is forgotten.
        if self._rb:
            self._rb.consume()
        self.close_events_lost_recovered += self.flows.forget_missing(alive, read_ns)
        self.flows.expire()
        sums = self.obj.map("counters").percpu_u64_sums()
        self._kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}

    # ---- views -------------------------------------------------------------------------
    def snapshot(self) -> FlowSnapshot:
        return self.flows.snapshot()

    def health(self) -> SourceHealth:
        k = self._kernel
        return SourceHealth(
            events_read=dict(self.events_read),
            events_lost={"ringbuf_full": k.get("ringbuf_full", 0), "map_full": k.get("conns_full", 0)},
            map_entries={"tcp_conns": self._map_entries},
            map_capacity={"tcp_conns": self.config.conns_max_entries},
            kernel_counters=dict(k),
            callback_errors=(self._rb.callback_errors if self._rb else 0) + self.decode_errors,
        )
