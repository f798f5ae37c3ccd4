"""L4 source: loads bpf/tcpconn.bpf.c, turns its events and map sweeps into the flow table.

kernel `conns` map + `events` ring buffer -> (this module) -> ConnFacts into the sink the
runner wires in (agent/aggregate/flows.FlowTable) -> snapshot for the exporter
(exporter/prometheus/tcp.py). Also reports the kernel's own drop
counters so nothing is lost silently.
"""
from __future__ import annotations

import errno
import logging
import operator
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import Signal, Variant, load_with_fallback
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.kernel.record_decoder import RecordDecoder
from meshlens.agent.sources.tcp.facts import ConnFacts, ConnSink
from meshlens.agent.sources.base import AttachChoice, ObjectSource, SourceHealth
from meshlens.agent.sources.tcp.structs import (
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
            # Before 6.5 sendfile/splice bypass tcp_sendmsg through tcp_sendpage.
            Variant("fentry+sendpage", "fentry", ("fexit_tcp_sendmsg", "fexit_tcp_sendpage", "fexit_tcp_recvmsg"),
                    ("tcp_sendmsg", "tcp_sendpage", "tcp_recvmsg")),
            Variant("fentry", "fentry", ("fexit_tcp_sendmsg", "fexit_tcp_recvmsg"), ("tcp_sendmsg", "tcp_recvmsg")),
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

# Before 6.10 tcp_send_reset fires only for full sockets: RSTs refusing a SYN to a closed
# port (or sent for time-wait/request sockets) need these hooks. Used only where the
# tracepoint still has that layout (no trace_event_raw_tcp_send_reset type in the BTF).
RESET_NOSOCK = Signal(
    "tcp_reset_nosock",
    (Variant("fentry", "fentry", ("fentry_tcp_v4_send_reset", "fentry_tcp_v6_send_reset"),
             ("tcp_v4_send_reset", "tcp_v6_send_reset")),),
    required=False,
)


def signals_for(kf: KernelFeatures) -> Tuple[Signal, ...]:
    """The TCP signals this kernel needs: SIGNALS, plus socket-less resets before 6.10."""
    if kf.btf and not kf.kernel_btf_struct("trace_event_raw_tcp_send_reset"):
        return SIGNALS + (RESET_NOSOCK,)
    return SIGNALS


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
    # Opens are learnt from sweeps and close records; an event per open only doubles the
    # ring-buffer traffic of a connection storm. On for the live tap when it lands.
    emit_open_events: bool = False
    max_rollups: int = 10_000
    rollup_ttl_s: float = 600.0
    max_peers_per_workload: int = 0     # external peer addresses kept per workload; 0 = no cap
    peer_rerank_s: float = 30.0         # how often kept and folded peers are ranked by bytes


EVENT = RecordDecoder(MlEvent)
CONN = RecordDecoder(MlConn)
_CONN_FIELDS = ("tuple.saddr", "tuple.daddr", "tuple.sport", "tuple.dport", "tuple.family", "start_ns",
                "established_ns", "cgroup_id", "bytes_sent", "bytes_received", "segs_retrans", "rsts_sent",
                "rsts_received", "srtt_us", "pid", "netns", "direction", "comm")
_IN_EVENT = operator.itemgetter(*(EVENT.index["conn." + f] for f in _CONN_FIELDS))
_IN_CONN = operator.itemgetter(*(CONN.index[f] for f in _CONN_FIELDS))
_EV_SK, _EV_TS, _EV_TYPE, _EV_ERR, _EV_SEGS, _EV_RST, _EV_BS, _EV_BR = (
    EVENT.index[n] for n in ("sk", "ts_ns", "type", "err", "segs", "rst_sent", "bytes_sent", "bytes_received"))


def facts_from(sk: int, values: tuple, where: Callable[[tuple], tuple]) -> ConnFacts:
    """ConnFacts from a decoded record (`where` picks the ml_conn fields out of it)."""
    (saddr, daddr, sport, dport, fam, start, est, cg, bs, br, segs, rs, rr, srtt, pid, netns, direction,
     comm) = where(values)
    return ConnFacts(
        sk=sk, start_ns=start, direction=DIRECTION_NAMES.get(direction, "unknown"),
        process=comm.split(b"\0", 1)[0].decode("utf-8", "replace"), pid=pid, cgroup_id=cg, netns=netns,
        local_address=format_addr(fam, saddr), local_port=sport,
        peer_address=format_addr(fam, daddr), peer_port=dport,
        bytes_sent=bs, bytes_received=br, segs_retrans=segs, rsts_sent=rs, rsts_received=rr,
        established_ns=est, srtt_us=srtt,
    )


def _connect_latency(f: ConnFacts) -> Optional[float]:
    """SYN sent -> established, for connections this node opened and saw open."""
    if f.direction == "outbound" and f.established_ns and f.start_ns:
        return (f.established_ns - f.start_ns) / 1e9
    return None


class TcpSource(ObjectSource):
    name = "tcp"

    def __init__(self, flows: ConnSink, config: TcpConfig = TcpConfig(),
                 features: Optional[KernelFeatures] = None) -> None:
        self.config = config
        self.features = features or KernelFeatures.probe()
        self.flows = flows  # the aggregate stage's flow table, wired in by the runner
        self.obj: Optional[bpf.BpfObject] = None
        self._rb: Optional[bpf.RingBuffer] = None
        self._choices: List[AttachChoice] = []
        self._signals: Tuple[Signal, ...] = SIGNALS
        self.events_read: Dict[str, int] = {n: 0 for n in EVENT_NAMES.values()}
        self.decode_errors = 0
        self.close_events_lost_recovered = 0
        self._map_entries = 0
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        if RESET_NOSOCK not in self._signals:  # not planned, so load_with_fallback left them on
            for v in RESET_NOSOCK.variants:
                for prog in v.programs:
                    obj.program(prog).autoload = False
        obj.map("conns").max_entries = self.config.conns_max_entries
        obj.map("events").max_entries = self.config.ringbuf_bytes
        obj.set_rodata({"emit_retransmit_events": int(self.config.emit_retransmit_events),
                        "emit_open_events": int(self.config.emit_open_events)}, TcpconnRodata)

    def start(self) -> None:
        self._signals = signals_for(self.features)
        self.obj, self._choices = load_with_fallback(
            bpf.object_path("tcpconn"), self._signals, self.features, self._configure
        )
        self._rb = bpf.RingBuffer(self.obj.map("events"), self._on_event)
        for ch in self._choices:
            log.info("tcp: %s via %s (%s)", ch.signal, ch.chosen, ", ".join(ch.programs))

    # ---- events --------------------------------------------------------------------------
    def _on_event(self, data: bytes) -> None:
        if len(data) < EVENT.size:
            self.decode_errors += 1
            return
        v = EVENT.unpack(data)
        etype = v[_EV_TYPE]
        name = EVENT_NAMES.get(etype)
        if name is None:
            self.decode_errors += 1
            return
        self.events_read[name] += 1
        if etype == EV_RETRANSMIT:
            return  # counts come from total_retrans in the map; the event feeds the live tap later
        f = facts_from(v[_EV_SK], v, _IN_EVENT)
        if etype == EV_CLOSE:
            self.flows.closed(f, max(0, v[_EV_TS] - f.start_ns) / 1e9, connect_latency_s=_connect_latency(f))
        elif etype == EV_OPEN:
            self.flows.opened(f, _connect_latency(f))
        elif etype == EV_CONNECT_FAIL:
            self.flows.connect_failed(f, CONNECT_FAIL_REASONS.get(v[_EV_ERR], "other"))
        elif etype == EV_BYTES:
            self.flows.add_unowned(f, bytes_sent=v[_EV_BS], bytes_received=v[_EV_BR])
        elif etype == EV_RESET:
            self.flows.add_unowned(f, **({"rsts_sent": 1} if v[_EV_RST] else {"rsts_received": 1}))
        elif etype == EV_SYNACK_RETRANSMIT:
            self.flows.add_unowned(f, segs_retrans=v[_EV_SEGS])

    # ---- sweeps --------------------------------------------------------------------------
    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        read_ns = time.monotonic_ns()
        items = self.obj.map("conns").items_raw()
        self._map_entries = len(items)
        alive = set()
        for kraw, vraw in items:
            sk = int.from_bytes(kraw, "little")
            f = facts_from(sk, CONN.unpack(vraw), _IN_CONN)
            alive.add((sk, f.start_ns))
            self.flows.seen(f, _connect_latency(f))
        # Close events are submitted before the kernel deletes the entry: draining the ring
        # buffer now credits every connection missing from `items` before it is forgotten.
        if self._rb:
            self._rb.consume()
        self.close_events_lost_recovered += self.flows.forget_missing(alive, read_ns)
        self.flows.expire()
        sums = self.obj.map("counters").percpu_u64_sums()
        self._kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}

    # ---- views -------------------------------------------------------------------------
    def snapshot(self):  # -> aggregate.flows.FlowSnapshot (whatever the sink snapshots)
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
