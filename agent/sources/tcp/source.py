"""L4 source: loads bpf/tcpconn.bpf.c, runs its sweep iterator and reads its rollups.

kernel `rollups` map (aggregated in the kernel) + `events` ring buffer (overflow, follow
mode) -> (this module) -> rollup deltas into the sink the runner wires in
(agent/aggregate/flows.FlowTable) -> snapshot for the exporter (exporter/prometheus/tcp.py).

At start, run the `adopt_tcp` iterator once per network namespace (connections and
listeners older than the agent). Each sweep: run the `sweep_conns` iterator over the kernel's
own connection map (it credits live connections' byte counters to their rollups in the
kernel), drain the ring buffer, read the rollups map and hand the sink what changed since
the last read. User-space work per sweep is per rollup, not per connection. Rollups idle for the TTL with no live connection are
removed from the kernel map. Also reports the kernel's own drop counters, so nothing is lost
silently.
"""
from __future__ import annotations

import bisect
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import Signal, Variant, load_with_fallback
from meshlens.agent.kernel.bpf_iter import read_iter
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.kernel.netns import NetnsDirectory, in_each
from meshlens.agent.kernel.record_decoder import RecordDecoder
from meshlens.agent.sources.base import AttachChoice, ObjectSource, SourceHealth
from meshlens.agent.sources.tcp.facts import ConnEvent, RollupKey, RollupSink
from meshlens.agent.sources.tcp.structs import (
    COUNTER_NAMES, D_CLOSED, D_CONNECT, D_DURATION, D_OPENED, D_RTT, DIRECTION_NAMES, DUR_BOUNDS_NS,
    EV_CLOSE, EV_CONNECT_FAIL, EV_LISTENER, EV_OPEN, EV_OVERFLOW, EVENT_NAMES, FAIL_REASONS, LAT_BOUNDS_NS,
    R_ACTIVE, R_BYTES_RECEIVED, R_BYTES_SENT, R_CLOSED, R_CONNECT_HIST, R_CONNECT_SUM, R_DURATION_HIST,
    R_DURATION_SUM, R_FAILED, R_OPENED, R_RSTS_RECEIVED, R_RSTS_SENT, R_RTT_HIST, R_RTT_SUM, R_SEGS_RETRANS,
    ROLLUP_WORDS, MlEvent, MlListener, MlListenerKey, MlRollupKey, MlSettings, TcpconnRodata, format_addr,
)

log = logging.getLogger("meshlens.tcp")

SIGNALS = (
    # tp_btf first: the classic tracepoint builds a trace record for every state change of
    # every socket before the program runs (bench/README.md, "L4 alone").
    Signal("tcp_state", (Variant("tp_btf", "tp_btf", ("handle_set_state_btf",), ("inet_sock_set_state",)),
                         Variant("tracepoint", "tracepoint", ("handle_set_state",), ("sock/inet_sock_set_state",)))),
    Signal(
        "tcp_bytes",
        (
            # The socket's own counters, read at state changes and by an iterator over the
            # tracked connections at each sweep (plus iter/tcp once at start for older ones):
            # nothing runs per send or receive call.
            Variant("iter", "iter", ("sweep_conns", "adopt_tcp"), ("run", "tcp")),
            # Fallbacks where BPF iterators are missing: a program on every send and receive.
            # Before 6.5 sendfile/splice bypass tcp_sendmsg through tcp_sendpage.
            Variant("fentry+sendpage", "fentry", ("fexit_tcp_sendmsg", "fexit_tcp_sendpage", "fexit_tcp_recvmsg"),
                    ("tcp_sendmsg", "tcp_sendpage", "tcp_recvmsg")),
            Variant("fentry", "fentry", ("fexit_tcp_sendmsg", "fexit_tcp_recvmsg"), ("tcp_sendmsg", "tcp_recvmsg")),
            Variant(
                "per-call", "tracepoint", ("handle_send_length", "handle_recv_length"),
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


@dataclass(frozen=True)
class TcpConfig:
    conns_max_entries: int = 65536
    rollups_max_entries: int = 16384
    ringbuf_bytes: int = 4 << 20
    # Wake the agent early only when this much is waiting; otherwise records wait for the sweep.
    ringbuf_wake_bytes: int = 1 << 20
    emit_retransmit_events: bool = True
    max_rollups: int = 10_000
    rollup_ttl_s: float = 600.0
    max_peers_per_workload: int = 0     # external peer addresses kept per workload; 0 = no cap
    peer_rerank_s: float = 30.0         # how often kept and folded peers are ranked by bytes


EVENT = RecordDecoder(MlEvent)
_KEY = struct.Struct("<Q16sIHHB7x16s")  # struct ml_rollup_key
_WORDS = struct.Struct("<QQq" + "Q" * (ROLLUP_WORDS - 3))  # struct ml_rollup as u64 words
_E = {n: EVENT.index[n] for n in EVENT.names}


def key_from(cgroup_id: int, peer: bytes, netns: int, server_port: int, family: int, direction: int,
             comm: bytes) -> RollupKey:
    return RollupKey(DIRECTION_NAMES.get(direction, "unknown"), comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
                     cgroup_id, netns, format_addr(family, peer), server_port)


def delta_words(flags: int, fail: int, active: int, bytes_sent: int, bytes_received: int, segs_retrans: int,
                rsts_sent: int, rsts_received: int, connect_ns: int, rtt_us: int, duration_ns: int) -> List[int]:
    """A struct ml_delta as struct ml_rollup words, bucketed as the kernel does (v <= le)."""
    w = [0] * ROLLUP_WORDS
    w[R_OPENED] = 1 if flags & D_OPENED else 0
    w[R_CLOSED] = 1 if flags & D_CLOSED else 0
    w[R_ACTIVE] = active
    if 0 < fail <= len(FAIL_REASONS):
        w[R_FAILED + fail - 1] = 1
    w[R_BYTES_SENT], w[R_BYTES_RECEIVED], w[R_SEGS_RETRANS] = bytes_sent, bytes_received, segs_retrans
    w[R_RSTS_SENT], w[R_RSTS_RECEIVED] = rsts_sent, rsts_received
    if flags & D_CONNECT:
        w[R_CONNECT_SUM] = connect_ns
        w[R_CONNECT_HIST + bisect.bisect_left(LAT_BOUNDS_NS, connect_ns)] = 1
    if flags & D_RTT:
        w[R_RTT_SUM] = rtt_us
        w[R_RTT_HIST + bisect.bisect_left(LAT_BOUNDS_NS, rtt_us * 1000)] = 1
    if flags & D_DURATION:
        w[R_DURATION_SUM] = duration_ns
        w[R_DURATION_HIST + bisect.bisect_left(DUR_BOUNDS_NS, duration_ns)] = 1
    return w


def socket_owners(inodes: Set[int], proc: str = "/proc") -> Dict[int, Tuple[int, str]]:
    """socket inode -> (pid, comm), from /proc/<pid>/fd links ("socket:[inode]")."""
    want = {f"socket:[{i}]": i for i in inodes}
    found: Dict[int, Tuple[int, str]] = {}
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                ino = want.get(os.readlink(f"{proc}/{pid}/fd/{fd}"))
            except OSError:
                continue
            if ino is not None and ino not in found:
                try:
                    with open(f"{proc}/{pid}/comm") as f:
                        found[ino] = (int(pid), f.read().strip())
                except OSError:
                    pass
        if len(found) == len(want):
            break
    return found


class TcpSource(ObjectSource):
    name = "tcp"

    def __init__(self, flows: RollupSink, config: TcpConfig = TcpConfig(),
                 features: Optional[KernelFeatures] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.features = features or KernelFeatures.probe()
        self.flows = flows  # the aggregate stage's flow table, wired in by the runner
        self._clock = clock
        self.obj: Optional[bpf.BpfObject] = None
        self._rb: Optional[bpf.RingBuffer] = None
        self._sweeper: Optional[bpf.Program] = None
        self._choices: List[AttachChoice] = []
        self._signals: Tuple[Signal, ...] = SIGNALS
        self.events_read: Dict[str, int] = {n: 0 for n in EVENT_NAMES.values()}
        self.decode_errors = 0
        self._kernel: Dict[str, int] = {n: 0 for n in COUNTER_NAMES}
        self._netns = NetnsDirectory()
        self.netns_adopted = 0
        self.netns_missed = 0
        # kernel rollups as last read: raw key -> (raw value, words, time it last changed)
        self._last: Dict[bytes, Tuple[bytes, Tuple[int, ...], float]] = {}
        self._keys: Dict[bytes, RollupKey] = {}
        self.rollups_evicted = 0
        self._unknown_listeners: Dict[int, bytes] = {}  # socket inode -> listeners map key
        self.listeners_named = 0
        self._followers: List[Callable[[ConnEvent], None]] = []
        self._follow = False

    # ---- lifecycle ---------------------------------------------------------------------
    def _configure(self, obj: bpf.BpfObject) -> None:
        if RESET_NOSOCK not in self._signals:  # not planned, so load_with_fallback left them on
            for v in RESET_NOSOCK.variants:
                for prog in v.programs:
                    obj.program(prog).autoload = False
        obj.map("conns").max_entries = self.config.conns_max_entries
        obj.map("rollups").max_entries = self.config.rollups_max_entries
        obj.map("events").max_entries = self.config.ringbuf_bytes
        per_call = any(obj.program(p).autoload for p in ("handle_send_length", "fexit_tcp_sendmsg"))
        obj.set_rodata({"emit_retransmit_events": int(self.config.emit_retransmit_events),
                        "bytes_per_call": int(per_call)}, TcpconnRodata)

    def start(self) -> None:
        self._signals = signals_for(self.features)
        self.obj, self._choices = load_with_fallback(
            bpf.object_path("tcpconn"), self._signals, self.features, self._configure
        )
        self._rb = bpf.RingBuffer(self.obj.map("events"), self._on_event)
        sweeper = self.obj.program("sweep_conns")
        self._sweeper = sweeper if sweeper.autoload else None
        self._write_settings()
        for ch in self._choices:
            log.info("tcp: %s via %s (%s)", ch.signal, ch.chosen, ", ".join(ch.programs))
        self._adopt()  # connections open before the agent are counted from here on

    def stop(self) -> None:
        self._sweeper = None
        super().stop()

    # ---- follow mode -------------------------------------------------------------------
    @property
    def following(self) -> bool:
        return self._follow

    def set_follow(self, on: bool) -> None:
        """Switch per-connection events on the ring buffer on or off (off by default: nobody
        pays for a stream nobody watches)."""
        self._follow = bool(on)
        self._write_settings()

    def subscribe(self, callback: Callable[[ConnEvent], None]) -> Callable[[], None]:
        """Receive a ConnEvent per connection open, close and failed connect (from the
        runner's thread); following starts with the first subscriber and stops after the last.
        Returns the function that unsubscribes."""
        self._followers.append(callback)
        if not self._follow:
            self.set_follow(True)

        def unsubscribe() -> None:
            if callback in self._followers:
                self._followers.remove(callback)
            if not self._followers and self._follow:
                self.set_follow(False)
        return unsubscribe

    def _write_settings(self) -> None:
        if self.obj:
            s = MlSettings(follow=int(self._follow), wake_bytes=self.config.ringbuf_wake_bytes)
            self.obj.map("settings").update_raw(bytes(4), bytes(s))

    # ---- events --------------------------------------------------------------------------
    def _on_event(self, data: bytes) -> None:
        if len(data) < EVENT.size:
            self.decode_errors += 1
            return
        v = EVENT.unpack(data)
        etype = v[_E["type"]]
        name = EVENT_NAMES.get(etype)
        if name is None:
            self.decode_errors += 1
            return
        self.events_read[name] += 1
        if etype == EV_OVERFLOW:
            self.flows.add(self._event_key(v), self._event_delta(v))
        elif etype == EV_LISTENER:
            self._unknown_listeners[v[_E["inode"]]] = bytes(MlListenerKey(netns=v[_E["key.netns"]],
                                                                          port=v[_E["tuple.sport"]]))
        elif etype in (EV_OPEN, EV_CLOSE, EV_CONNECT_FAIL) and self._followers:
            ev = self._conn_event(name, v)
            for fn in list(self._followers):
                fn(ev)
        # EV_RETRANSMIT: counts come from total_retrans; the record feeds the stream later.

    @staticmethod
    def _event_key(v: tuple) -> RollupKey:
        return key_from(v[_E["key.cgroup_id"]], v[_E["key.peer"]], v[_E["key.netns"]], v[_E["key.server_port"]],
                        v[_E["key.family"]], v[_E["key.direction"]], v[_E["key.comm"]])

    @staticmethod
    def _event_delta(v: tuple) -> List[int]:
        g = lambda n: v[_E["delta." + n]]  # noqa: E731
        return delta_words(g("flags"), g("fail"), g("active"), g("bytes_sent"), g("bytes_received"),
                           g("segs_retrans"), g("rsts_sent"), g("rsts_received"), g("connect_ns"), g("rtt_us"),
                           g("duration_ns"))

    def _conn_event(self, name: str, v: tuple) -> ConnEvent:
        fam = v[_E["tuple.family"]]
        fail = v[_E["delta.fail"]]
        return ConnEvent(
            type=name, ts_ns=v[_E["ts_ns"]], key=self._event_key(v),
            local_address=format_addr(fam, v[_E["tuple.saddr"]]), local_port=v[_E["tuple.sport"]],
            peer_address=format_addr(fam, v[_E["tuple.daddr"]]), peer_port=v[_E["tuple.dport"]],
            pid=v[_E["pid"]], bytes_sent=v[_E["total_sent"]], bytes_received=v[_E["total_received"]],
            duration_s=v[_E["duration_ns"]] / 1e9,
            connect_latency_s=v[_E["delta.connect_ns"]] / 1e9 if v[_E["delta.flags"]] & D_CONNECT else 0.0,
            reason=FAIL_REASONS[fail - 1] if 0 < fail <= len(FAIL_REASONS) else "",
            rtt_s=v[_E["delta.rtt_us"]] / 1e6,
        )

    # ---- sweeps --------------------------------------------------------------------------
    def _adopt(self) -> None:
        """Connections and listeners older than the agent: iter/tcp once per network
        namespace (an iterator shows only its reader's namespace)."""
        link = next((ln for ln in self.obj.links if ln.program == "adopt_tcp"), None) if self.obj else None
        if link is None:
            return
        results, missed = in_each(self._netns.scan(), self._netns.own, lambda: read_iter(link))
        self.netns_adopted = len(results)
        self.netns_missed += missed

    def _run_iterator(self) -> None:
        """Credit every tracked live connection's counters in the kernel (one pass over `conns`)."""
        if self._sweeper is not None:
            self._sweeper.run()

    def sweep(self, now_ns: int) -> None:
        if not self.obj:
            return
        self._run_iterator()
        if self._rb:
            self._rb.consume()
        self._read_rollups()
        self._name_listeners()
        self.flows.expire()
        sums = self.obj.map("counters").percpu_u64_sums()
        self._kernel = {n: sums[i] for i, n in enumerate(COUNTER_NAMES)}

    def _key(self, kraw: bytes) -> RollupKey:
        k = self._keys.get(kraw)
        if k is None:
            k = self._keys[kraw] = key_from(*_KEY.unpack(kraw))
        return k

    def _read_rollups(self) -> None:
        m = self.obj.map("rollups")
        now = self._clock()
        seen = set()
        for kraw, vraw in m.items_raw():
            seen.add(kraw)
            last = self._last.get(kraw)
            if last is not None and last[0] == vraw:
                continue
            words = _WORDS.unpack(vraw)
            old = last[1] if last is not None else None
            self.flows.add(self._key(kraw), words if old is None else [a - b for a, b in zip(words, old)])
            self._last[kraw] = (vraw, words, now)
        for gone in [k for k in self._last if k not in seen]:  # removed behind our back: start over
            del self._last[gone]
            self._keys.pop(gone, None)
        self._evict(m, now)

    def _evict(self, m: bpf.Map, now: float) -> None:
        """Remove kernel rollups idle for the TTL with no live connection, crediting anything
        that arrived since the last read (lookup-and-delete is atomic)."""
        cutoff = now - self.config.rollup_ttl_s
        for kraw, (vraw, words, changed) in list(self._last.items()):
            if changed >= cutoff or words[R_ACTIVE] > 0:
                continue
            final = m.lookup_and_delete_raw(kraw)
            if final is not None and final != vraw:
                self.flows.add(self._key(kraw), [a - b for a, b in zip(_WORDS.unpack(final), words)])
            del self._last[kraw]
            self._keys.pop(kraw, None)
            self.rollups_evicted += 1

    def _name_listeners(self) -> None:
        """Listening sockets that predate the agent: find their process, so connections they
        accept from now on carry its name."""
        if not self._unknown_listeners or not self.obj:
            return
        pending, self._unknown_listeners = self._unknown_listeners, {}
        listeners = self.obj.map("listeners")
        for ino, (pid, comm) in socket_owners(set(pending)).items():
            val = MlListener(comm=comm.encode()[:15], pid=pid)
            try:
                listeners.update_raw(pending[ino], bytes(val), 2)  # BPF_EXIST: still listening
                self.listeners_named += 1
            except bpf.BpfError:
                pass

    # ---- views -------------------------------------------------------------------------
    def snapshot(self):  # -> aggregate.flows.FlowSnapshot (whatever the sink snapshots)
        return self.flows.snapshot()

    def health(self) -> SourceHealth:
        k = self._kernel
        live = sum(max(0, w[R_ACTIVE]) for _, w, _ in self._last.values())
        return SourceHealth(
            events_read=dict(self.events_read),
            events_lost={"ringbuf_full": k.get("ringbuf_full", 0), "map_full": k.get("conns_full", 0)},
            map_entries={"tcp_conns": live, "tcp_rollups": len(self._last)},
            map_capacity={"tcp_conns": self.config.conns_max_entries, "tcp_rollups": self.config.rollups_max_entries},
            kernel_counters={**k, "rollups_evicted": self.rollups_evicted, "netns_adopted": self.netns_adopted,
                             "netns_missed": self.netns_missed, "listeners_named": self.listeners_named},
            callback_errors=(self._rb.callback_errors if self._rb else 0) + self.decode_errors,
        )
