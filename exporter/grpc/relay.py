"""`meshlens relay`: one follow stream to every agent, merged in time order, served as the
same Observer API cluster-wide.

Place in the data flow: agents' GetFlows streams (exporter/grpc/observer.py on each node)
-> one AgentLink thread per agent (reconnects with exponential backoff, announces the node
connected or unavailable as `node_status`) -> SortWindow (holds responses `window_s`
seconds and releases them in time order; bounded by `max_items`, so a burst forces the
oldest out early instead of growing) -> the relay's FlowHub -> ObserverServicer, exactly as
on an agent. The agents to follow come from a static list or from the endpoints of the
agents' headless Service (exporter/grpc/discovery.py); `sync()` adds and removes links.

While the relay runs it follows every agent, so each agent's kernel follow switch stays on
(as Hubble's agents always record); the relay's ring holds the cluster's recent flows for
requests without `follow`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import grpc

from meshlens.exporter.grpc.convert import count_flows, node_status, time_ns
from meshlens.exporter.grpc.hub import FlowHub
from meshlens.exporter.grpc.observer import ObserverServicer, software_version
from meshlens.exporter.grpc.tls import ClientTls, aio_channel
from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg

log = logging.getLogger("meshlens.relay")

RELEASE_EVERY_S = 0.05


class SortWindow:
    """Responses from many streams in time order: each is held until `window_s` has passed
    since its time, then released oldest first. At most `max_items` are held; one more forces
    the oldest out (counted). One that arrives after a newer one was released is still sent
    (counted as late): order is best effort beyond the window, loss never."""

    def __init__(self, window_s: float, max_items: int, publish: Callable[[pb.GetFlowsResponse], None],
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.window_ns = int(window_s * 1e9)
        self.max_items = max_items
        self._publish = publish
        self._clock = clock_ns
        self._heap: List[Tuple[int, int, pb.GetFlowsResponse]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.last_ns = 0
        self.late = 0
        self.forced = 0

    def __len__(self) -> int:
        return len(self._heap)

    def _emit(self, t: int, r: pb.GetFlowsResponse) -> None:
        if t < self.last_ns:
            self.late += 1
        else:
            self.last_ns = t
        self._publish(r)

    def push(self, r: pb.GetFlowsResponse) -> None:
        t = time_ns(r)
        with self._lock:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, r))
            while len(self._heap) > self.max_items:
                t0, _, r0 = heapq.heappop(self._heap)
                self.forced += 1
                self._emit(t0, r0)

    def release(self, now_ns: Optional[int] = None) -> int:
        """Publish every response older than the window; returns how many."""
        edge = (self._clock() if now_ns is None else now_ns) - self.window_ns
        n = 0
        with self._lock:
            while self._heap and self._heap[0][0] <= edge:
                t, _, r = heapq.heappop(self._heap)
                self._emit(t, r)
                n += 1
        return n

    def flush(self) -> None:
        with self._lock:
            while self._heap:
                t, _, r = heapq.heappop(self._heap)
                self._emit(t, r)


@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    current: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.current = self.initial_s

    def next(self) -> float:
        d = self.current
        self.current = min(self.max_s, self.current * self.factor)
        return d

    def reset(self) -> None:
        self.current = self.initial_s


class LoopThread:
    """One asyncio event loop in a thread: every AgentLink's stream runs on it (grpc.aio),
    so receiving costs no thread hand-off per message."""

    def __init__(self, name: str = "relay-links") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def submit(self, coro) -> "concurrent.futures.Future":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class SharedLoop(LoopThread):
    """A loop someone else runs (the relay's gRPC server's): links and the sort window's
    releases share it with the client streams, one thread for the whole relay."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:  # noqa: super-init-not-called
        self.loop = loop

    def stop(self) -> None:
        pass


class AgentLink:
    """One agent: GetNodes (its node name), then GetFlows(follow) into `on_response`,
    reconnecting with backoff. State changes go to `on_state(link, state, message)`."""

    def __init__(self, address: str, tls: Optional[ClientTls], on_response: Callable[[pb.GetFlowsResponse], None],
                 on_state: Callable[["AgentLink", int, str], None], backoff: Optional[Backoff] = None,
                 connect_timeout_s: float = 5.0, loop: Optional[LoopThread] = None) -> None:
        self.address = address
        self.tls = tls
        self.name = address            # the node's name once it answered GetNodes
        self.version = ""
        self.state = pb.Node.UNKNOWN_NODE_STATE
        self.message = ""
        self.connected_at = 0.0
        self.flows = 0
        self.connects = 0
        self._on_response = on_response
        self._on_state = on_state
        self._backoff = backoff or Backoff()
        self._timeout = connect_timeout_s
        self._own_loop = loop is None
        self._loop = loop or LoopThread(f"relay-{address}")
        self._future: Optional["concurrent.futures.Future"] = None

    def start(self) -> "AgentLink":
        self._future = self._loop.submit(self._run())
        return self

    def stop(self) -> None:
        fut = self._future
        if fut is not None and not fut.done():
            self._loop.loop.call_soon_threadsafe(fut.cancel)
            try:
                fut.result(5)
            except BaseException:  # noqa: BLE001 - cancelled, as asked
                pass
        if self._own_loop:
            self._loop.stop()

    async def _run(self) -> None:
        while True:
            message = "stream ended"
            try:
                ch = aio_channel(self.address, self.tls)
            except ValueError as exc:      # TlsError: unreadable files, the same on every try
                ch, message = None, str(exc)
            if ch is not None:
                try:
                    await self._follow(ch)
                except grpc.aio.AioRpcError as exc:
                    message = f"{exc.code().name}: {exc.details()}"
                finally:
                    await ch.close()
            self._set(pb.Node.NODE_UNAVAILABLE, message)
            await asyncio.sleep(self._backoff.next())

    async def _follow(self, ch: "grpc.aio.Channel") -> None:
        stub = pbg.ObserverStub(ch)
        nodes = (await stub.GetNodes(pb.GetNodesRequest(), timeout=self._timeout)).nodes
        if nodes:
            self.name, self.version = nodes[0].name or self.address, nodes[0].version
        call = stub.GetFlows(pb.GetFlowsRequest(follow=True))
        await call.wait_for_connection()
        self.connects += 1
        self.connected_at = time.monotonic()
        self._backoff.reset()
        self._set(pb.Node.NODE_CONNECTED, "")
        async for r in call:
            if r.WhichOneof("response_types") == "flow":
                self.flows += 1
            self._on_response(r)

    def _set(self, state: int, message: str) -> None:
        changed = state != self.state
        self.state, self.message = state, message
        if changed:
            log.info("node %s (%s): %s %s", self.name, self.address, pb.Node.State.Name(state), message)
            self._on_state(self, state, message)


@dataclass(frozen=True)
class RelayConfig:
    agents: Tuple[str, ...] = ()
    sort_window_s: float = 2.0
    max_buffered: int = 100_000
    ring_size: int = 16_384
    queue_size: int = 8192
    name: str = "relay"
    tls: Optional[ClientTls] = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.hub = FlowHub(config.name, config.ring_size, config.queue_size)
        self.window = SortWindow(config.sort_window_s, config.max_buffered, self._publish)
        self.links: Dict[str, AgentLink] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.relayed = 0
        self.lost_upstream: Dict[str, int] = {}
        self.servicer = ObserverServicer(self.hub, self.status, self.nodes)
        self.started = time.monotonic()
        self._links_loop: Optional[LoopThread] = None

    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> "Relay":
        """Follow the agents; on `loop` (running in another thread, e.g. GrpcServer.loop) or on
        a loop of its own."""
        self._links_loop = SharedLoop(loop) if loop is not None else LoopThread()
        self._release_future = self._links_loop.submit(self._release_task())
        self.sync(self.config.agents)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            links, self.links = list(self.links.values()), {}
        for link in links:
            link.stop()
        fut = getattr(self, "_release_future", None)
        if fut is not None and self._links_loop is not None and not self._links_loop.loop.is_closed():
            self._links_loop.loop.call_soon_threadsafe(fut.cancel)
        if self._links_loop is not None:
            self._links_loop.stop()
        self.window.flush()

    def sync(self, addresses: Iterable[str]) -> None:
        """Follow exactly these agents: new addresses get a link, gone ones are stopped."""
        want = list(dict.fromkeys(a for a in addresses if a))
        with self._lock:
            gone = [self.links.pop(a) for a in list(self.links) if a not in want]
            for a in want:
                if a not in self.links:
                    self.links[a] = AgentLink(a, self.config.tls, self.window.push, self._on_state,
                                              Backoff(self.config.backoff_initial_s, self.config.backoff_max_s),
                                              loop=self._links_loop).start()
        for link in gone:
            link.stop()
            self.window.push(node_status(self.config.name, pb.NodeStatusEvent.NODE_GONE, [link.name],
                                         f"{link.address} left the agent list"))

    def _on_state(self, link: AgentLink, state: int, message: str) -> None:
        change = {pb.Node.NODE_CONNECTED: pb.NodeStatusEvent.NODE_CONNECTED,
                  pb.Node.NODE_UNAVAILABLE: pb.NodeStatusEvent.NODE_UNAVAILABLE}[state]
        self.window.push(node_status(link.name, change, [link.name], message))

    def _publish(self, r: pb.GetFlowsResponse) -> None:
        kind = r.WhichOneof("response_types")
        if kind == "flow":
            self.relayed += 1
        elif kind == "lost_events":
            src = pb.LostEvent.Source.Name(r.lost_events.source)
            self.lost_upstream[src] = self.lost_upstream.get(src, 0) + r.lost_events.num_events_lost
        self.hub.publish(r)

    async def _release_task(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_EVERY_S)
            self.window.release()

    # ---- status ----------------------------------------------------------------------------
    def _links(self) -> List[AgentLink]:
        with self._lock:
            return list(self.links.values())

    def status(self) -> pb.ServerStatusResponse:
        links = self._links()
        down = [l.name for l in links if l.state != pb.Node.NODE_CONNECTED]
        h = self.hub
        return pb.ServerStatusResponse(num_flows=count_flows(h.past()), max_flows=h.ring_size, seen_flows=h.seen_flows,
                                       flows_rate=h.flows_rate(), uptime_seconds=h.uptime(),
                                       version=software_version(), num_connected_nodes=len(links) - len(down),
                                       num_unavailable_nodes=len(down), unavailable_nodes=sorted(down),
                                       lost_events=h.lost_to_clients() + sum(self.lost_upstream.values()))

    def nodes(self) -> List[pb.Node]:
        now = time.monotonic()
        out = []
        for l in sorted(self._links(), key=lambda x: x.name):
            up = l.state == pb.Node.NODE_CONNECTED
            out.append(pb.Node(name=l.name, version=l.version, address=l.address,
                               state=l.state if l.state else pb.Node.NODE_UNAVAILABLE, tls=l.tls is not None,
                               uptime_seconds=now - l.connected_at if up else 0.0, seen_flows=l.flows,
                               message=l.message))
        return out
