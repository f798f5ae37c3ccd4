"""FlowHub: the in-memory ring of recent Observer responses and the bounded per-client
queues they fan out to.

Place in the data flow: the agent's feed (exporter/grpc/observer.AgentFeed) or the relay's
merge (exporter/grpc/relay.py) publishes GetFlowsResponse messages here, in time order;
each GetFlows call reads past ones from the ring and, when following, new ones from its own
Subscriber. Memory is bounded twice: the ring keeps `ring_size` responses, and a client
that stops reading has at most `queue_size` queued; what does not fit is counted and
reaches the client as one `lost_events` record at the place of the gap, once it reads again.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Deque, List, Optional, Set, Tuple

from meshlens.exporter.grpc.convert import lost
from meshlens.exporter.proto import observer_pb2 as pb

RATE_WINDOW_S = 60.0


class Subscriber:
    """One following client's bounded queue."""

    def __init__(self, maxlen: int, node: str) -> None:
        self.maxlen = maxlen
        self.node = node
        self._q: Deque[pb.GetFlowsResponse] = collections.deque()
        self._cv = threading.Condition()
        self.gap = 0            # responses dropped since the last one queued
        self.lost_total = 0
        self.closed = False
        # an asyncio reader (the gRPC server's loop) waits without a thread: put() calls
        # `waker` (thread-safe) only while the reader said it is waiting, so a busy stream
        # costs no cross-thread wake-ups
        self.waker: Optional[Callable[[], None]] = None
        self.waiting = False

    def put(self, r: pb.GetFlowsResponse) -> None:
        with self._cv:
            if len(self._q) >= self.maxlen:
                self.gap += 1
                self.lost_total += 1
                return
            if self.gap:
                self._q.append(lost(self.node, pb.LostEvent.OBSERVER_EVENTS_QUEUE, self.gap, r.time.ToNanoseconds()))
                self.gap = 0
            self._q.append(r)
            self._cv.notify()
            wake = self.waker if self.waiting else None
            self.waiting = False
        if wake is not None:
            wake()

    def get(self, timeout: float) -> Optional[pb.GetFlowsResponse]:
        """The next response, or None after `timeout` with nothing to send."""
        with self._cv:
            if not self._q and not self.gap:
                self._cv.wait(timeout)
            if self._q:
                return self._q.popleft()
            if self.gap:        # caught up with nothing newer queued: report the gap now
                n, self.gap = self.gap, 0
                return lost(self.node, pb.LostEvent.OBSERVER_EVENTS_QUEUE, n)
            return None

    def get_nowait(self, wait_next: bool = False) -> Optional[pb.GetFlowsResponse]:
        """The next response or None; with `wait_next`, a None also arms the waker for the next put()."""
        with self._cv:
            if self._q:
                return self._q.popleft()
            if self.gap:
                n, self.gap = self.gap, 0
                return lost(self.node, pb.LostEvent.OBSERVER_EVENTS_QUEUE, n)
            if wait_next:
                self.waiting = True
            return None

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
            wake = self.waker if self.waiting else None
        if wake is not None:
            wake()

    def __len__(self) -> int:
        return len(self._q)


class FlowHub:
    def __init__(self, node: str, ring_size: int = 4096, queue_size: int = 4096,
                 on_first: Callable[[], None] = lambda: None, on_last: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.queue_size = queue_size
        self._ring: Deque[pb.GetFlowsResponse] = collections.deque(maxlen=ring_size)
        self._subs: Set[Subscriber] = set()
        self._lock = threading.Lock()
        self._on_first, self._on_last = on_first, on_last
        self._clock = clock
        self.started = clock()
        self.seen_flows = 0
        self.published = 0
        self.ring_dropped = 0   # old responses pushed out of the ring (history, not loss)
        self.client_lost = 0    # responses dropped for clients that left (see lost_to_clients)
        self._rate: Deque[Tuple[float, int]] = collections.deque()   # (time, seen_flows) samples

    @property
    def ring_size(self) -> int:
        return self._ring.maxlen or 0

    def publish(self, r: pb.GetFlowsResponse) -> None:
        with self._lock:
            if len(self._ring) == self._ring.maxlen:
                self.ring_dropped += 1
            self._ring.append(r)
            self.published += 1
            if r.WhichOneof("response_types") == "flow":
                self.seen_flows += 1
            subs = list(self._subs)
        for s in subs:
            s.put(r)

    def subscribe(self) -> Tuple[List[pb.GetFlowsResponse], Subscriber]:
        """The ring's content and a new Subscriber, atomically: nothing falls between them."""
        sub = Subscriber(self.queue_size, self.node)
        with self._lock:
            past = list(self._ring)
            self._subs.add(sub)
            first = len(self._subs) == 1
        if first:
            self._on_first()
        return past, sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()
        with self._lock:
            if sub in self._subs:
                self.client_lost += sub.lost_total
            self._subs.discard(sub)
            last = not self._subs
        if last:
            self._on_last()

    def past(self) -> List[pb.GetFlowsResponse]:
        with self._lock:
            return list(self._ring)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def lost_to_clients(self) -> int:
        with self._lock:
            return self.client_lost + sum(s.lost_total for s in self._subs)

    def flows_rate(self) -> float:
        """Flows per second over the last minute (from samples taken at each call)."""
        now = self._clock()
        with self._lock:
            self._rate.append((now, self.seen_flows))
            while len(self._rate) > 1 and now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()
            t0, n0 = self._rate[0]
        if now - t0 <= 0:
            elapsed = now - self.started
            return self.seen_flows / elapsed if elapsed > 0 else 0.0
        return (self.seen_flows - n0) / (now - t0)

    def uptime(self) -> float:
        return self._clock() - self.started
