"""The Observer service (GetFlows, ServerStatus, GetNodes) over a FlowHub, and the agent's
feed that fills the hub while at least one client follows.

Place in the data flow: kernel switch on (first follower) -> TcpSource.subscribe() hands
ConnEvents from the runner's thread, DnsTracker.subscribe() hands DNS lookups (answered, or
given up) from the same thread, the HTTP tap (Agent.tap_open -> `tap_ctl`, which also sends
the packet path's DNS queries) puts sampled exchanges in the HTTP snapshot -> AgentFeed names them (exporter/grpc/convert.py)
and publishes them to the FlowHub -> ObserverServicer streams them to each client through
its bounded queue. The last follower leaving switches both off again. The relay
(exporter/grpc/relay.py) serves the same ObserverServicer over its own merged hub.

Order: an agent's stream is in the order events reach user space (connection events at
once, HTTP exchanges at the next sweep); the relay's is in time order (its sort window).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import AsyncIterator, Callable, Deque, List, Optional, Set

import grpc

from meshlens.exporter.api.filters import ParamError
from meshlens.exporter.grpc.convert import (conn_flow, count_flows, dns_flow, http_flows, lost, response, selector,
                                            time_ns, wall_ns)
from meshlens.exporter.grpc.hub import FlowHub
from meshlens.exporter.grpc.tls import SERVER_OPTIONS, ServerTls
from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg

log = logging.getLogger("meshlens.grpc")

TAP_POLL_S = 0.1
LOSS_CHECK_S = 1.0
SEEN_MAX = 8192        # tap records remembered as already published (the snapshot's deque holds 5000)
MAX_STREAMS = 64       # concurrent RPCs; the next one is refused (RESOURCE_EXHAUSTED), never queued


def software_version() -> str:
    try:
        return version("meshlens")
    except PackageNotFoundError:
        return "0+unknown"


class ObserverServicer(pbg.ObserverServicer):
    """GetFlows over `hub`; ServerStatus and GetNodes from the given callables. Runs on the
    gRPC server's asyncio loop (grpc.aio): one loop streams to every client, with no thread
    hand-off per message, which is what bounds a Python gRPC stream's rate."""

    def __init__(self, hub: FlowHub, status: Callable[[], pb.ServerStatusResponse],
                 nodes: Callable[[], List[pb.Node]], idle_s: float = 0.5) -> None:
        self.hub = hub
        self._status = status
        self._nodes = nodes
        self._idle = idle_s
        self.streams = 0

    async def GetFlows(self, request: pb.GetFlowsRequest, context) -> AsyncIterator[pb.GetFlowsResponse]:
        try:
            sel = selector(request)
        except ParamError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        # headers now, not with the first flow: a follower knows at once that the stream is open
        await context.send_initial_metadata(())
        sub = None
        if request.follow:
            past, sub = self.hub.subscribe()
        else:
            past = self.hub.past()
        self.streams += 1
        try:
            hist = [r for r in past if sel.in_time(time_ns(r)) and sel.wants(r)]
            if request.follow and not request.number and not request.HasField("since"):
                hist = []           # follow alone: only what happens from now on
            elif request.number:
                n = int(request.number)
                hist = hist[:n] if request.first else hist[-n:]
            for r in hist:
                yield sel.shape(r)
            if sub is None:
                return
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()
            sub.waker = lambda: loop.call_soon_threadsafe(ready.set)
            while not sub.closed:
                r = sub.get_nowait(wait_next=True)
                if r is None:
                    try:
                        await asyncio.wait_for(ready.wait(), self._idle)
                    except asyncio.TimeoutError:
                        pass
                    ready.clear()
                    continue
                t = time_ns(r)
                if sel.until_ns is not None and t > sel.until_ns:
                    return
                if (sel.since_ns is not None and t < sel.since_ns) or not sel.wants(r):
                    continue
                yield sel.shape(r)
        finally:
            self.streams -= 1
            if sub is not None:
                sub.waker = None
                self.hub.unsubscribe(sub)

    async def ServerStatus(self, request: pb.ServerStatusRequest, context) -> pb.ServerStatusResponse:
        return self._status()

    async def GetNodes(self, request: pb.GetNodesRequest, context) -> pb.GetNodesResponse:
        return pb.GetNodesResponse(nodes=self._nodes())


class GrpcServer:
    """A grpc.aio server on one address (optionally TLS/mTLS) in its own thread and event
    loop; `port` is the bound one. At most `max_streams` RPCs at once; the next is refused."""

    def __init__(self, servicer: ObserverServicer, address: str, tls: Optional[ServerTls] = None,
                 max_streams: int = MAX_STREAMS) -> None:
        self.servicer, self.address, self.tls, self.max_streams = servicer, address, tls, max_streams
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: Optional[grpc.aio.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping: Optional[asyncio.Event] = None
        self._grace = 1.0

    def start(self) -> "GrpcServer":
        started = threading.Event()
        failed: List[BaseException] = []
        creds = self.tls.credentials() if self.tls is not None else None   # a bad file fails here

        async def main() -> None:
            self._server = grpc.aio.server(options=list(SERVER_OPTIONS), maximum_concurrent_rpcs=self.max_streams)
            pbg.add_ObserverServicer_to_server(self.servicer, self._server)
            try:
                if creds is not None:
                    self.port = self._server.add_secure_port(self.address, creds)
                else:
                    self.port = self._server.add_insecure_port(self.address)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {self.address}: {exc}") from None
            self._stopping = asyncio.Event()
            await self._server.start()
            started.set()
            await self._stopping.wait()
            await self._server.stop(self._grace)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(main())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failed.append(exc)
            finally:
                started.set()
                # what grpc.aio left scheduled ends here, before the loop closes (as asyncio.run does)
                pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
                self._loop.close()

        self._thread = threading.Thread(target=run, name="grpc-server", daemon=True)
        self._thread.start()
        started.wait(15)
        if failed:
            raise failed[0]
        if not self.port:
            raise OSError(f"cannot listen on {self.address}")
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (running in its thread once started)."""
        return self._loop

    def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, give open RPCs `grace` seconds, then cancel them."""
        self._grace = grace
        if self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:        # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(grace + 5)


class AgentFeed:
    """Turns the agent's connection events and tap samples into hub flows while followed."""

    def __init__(self, agent, node: str, ring_size: int = 4096, queue_size: int = 4096,
                 pods_only: bool = False) -> None:
        self.agent = agent
        self.node = node
        self.pods_only = pods_only
        self.hub = FlowHub(node, ring_size, queue_size, on_first=self._switch_on, on_last=self._switch_off)
        self._lock = threading.Lock()
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._unsubscribe_dns: Optional[Callable[[], None]] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None
        self.conversion_errors = 0
        self.left_out = 0       # events of processes that are no pod (pods_only)

    @property
    def tcp(self):
        return next((s for s in getattr(self.agent, "sources", ()) if hasattr(s, "subscribe")), None)

    @property
    def dns(self):
        """The DnsTracker behind the "dns" area, if the agent parses L7."""
        return next((s.tracker for s in getattr(self.agent, "sources", ())
                     if getattr(s, "name", "") == "dns" and hasattr(s, "tracker")), None)

    @property
    def following(self) -> bool:
        return self._stop is not None

    # ---- the kernel switches ---------------------------------------------------------------
    def _switch_on(self) -> None:
        with self._lock:
            if self._stop is not None:
                return
            since_ns = time.monotonic_ns()
            if self.tcp is not None:
                self._unsubscribe = self.tcp.subscribe(self._on_conn)
            else:
                log.warning("the TCP source has no follow mode: the stream carries L7 flows only")
            dns = self.dns
            if dns is not None:     # before the tap: the packet path's queries come with it
                self._unsubscribe_dns = dns.subscribe(self._on_dns)
            self.agent.tap_open()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, args=(self._stop, since_ns), name="grpc-feed",
                                            daemon=True)
            self._thread.start()
            log.info("flow stream: follow mode on (connection events, HTTP tap, DNS)")

    def _switch_off(self) -> None:
        with self._lock:
            if self._stop is None or self.hub.subscribers:
                return
            self._stop.set()
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self.agent.tap_close()
            if self._unsubscribe_dns is not None:
                self._unsubscribe_dns()
                self._unsubscribe_dns = None
            thread, self._thread, self._stop = self._thread, None, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2)
        log.info("flow stream: follow mode off (no client follows)")

    def close(self) -> None:
        if self._stop is not None:
            with self.hub._lock:
                self.hub._subs.clear()
            self._switch_off()

    # ---- events to flows -------------------------------------------------------------------
    def _local_is_pod(self, cgroup_id: int, netns: int, process: str) -> bool:
        return bool(self.agent.identity.local(cgroup_id, netns, process).pod)

    def _on_conn(self, ev) -> None:
        """Runner thread: one ConnEvent."""
        try:
            k = ev.key
            if self.pods_only and not self._local_is_pod(k.cgroup_id, k.netns, k.process):
                self.left_out += 1
                return
            self.hub.publish(response(conn_flow(ev, self.agent.identity, self.node, wall_ns(ev.ts_ns))))
        except Exception:  # noqa: BLE001 - one bad event must not stop the runner
            self.conversion_errors += 1
            log.debug("connection event not converted", exc_info=True)

    def _on_dns(self, lk) -> None:
        """Runner thread: one DnsLookup (answered, or given up unanswered)."""
        try:
            if self.pods_only and not self._local_is_pod(lk.cgroup_id, lk.netns, lk.process):
                self.left_out += 1
                return
            self.hub.publish(response(dns_flow(lk, self.agent.identity, self.node, wall_ns(lk.ts_ns))))
        except Exception:  # noqa: BLE001 - one bad record must not stop the runner
            self.conversion_errors += 1
            log.debug("dns lookup not converted", exc_info=True)

    def _kernel_lost(self) -> int:
        n = 0
        for s in getattr(self.agent, "sources", ()):
            if s.name in ("tcp", "http"):
                try:
                    n += int(s.health().events_lost.get("ringbuf_full", 0))
                except Exception:  # noqa: BLE001 - a source not started has no counters
                    pass
        http = self.agent.area("http")
        return n + int(getattr(http, "tap_dropped", 0) or 0)

    def _poll(self, stop: threading.Event, since_ns: int) -> None:
        seen: Set[tuple] = set()
        order: Deque[tuple] = collections.deque()
        lost_mark = self._kernel_lost()
        next_check = time.monotonic() + LOSS_CHECK_S
        while not stop.wait(TAP_POLL_S):
            fresh = []
            for rec in getattr(self.agent.area("http"), "tap", ()) or ():
                if rec.ts_ns < since_ns:
                    continue        # sampled before anyone followed
                ident = (rec.ts_ns, rec.key, rec.duration_s, rec.peer_address)
                if ident in seen:
                    continue
                seen.add(ident)
                order.append(ident)
                if len(order) > SEEN_MAX:
                    seen.discard(order.popleft())
                fresh.append(rec)
            fresh.sort(key=lambda r: r.ts_ns)
            for rec in fresh:
                try:
                    k = rec.key
                    if self.pods_only and not self._local_is_pod(k.cgroup_id, k.netns, k.process):
                        self.left_out += 1
                        continue
                    for f in http_flows(rec, self.agent.identity, self.node, wall_ns(rec.ts_ns)):
                        self.hub.publish(response(f))
                except Exception:  # noqa: BLE001
                    self.conversion_errors += 1
                    log.debug("tap record not converted", exc_info=True)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LOSS_CHECK_S
                now_lost = self._kernel_lost()
                if now_lost > lost_mark:
                    self.hub.publish(lost(self.node, pb.LostEvent.PERF_EVENT_RING_BUFFER, now_lost - lost_mark))
                lost_mark = max(lost_mark, now_lost)

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> pb.ServerStatusResponse:
        h = self.hub
        return pb.ServerStatusResponse(num_flows=count_flows(h.past()), max_flows=h.ring_size, seen_flows=h.seen_flows,
                                       flows_rate=h.flows_rate(), uptime_seconds=h.uptime(),
                                       version=software_version(), num_connected_nodes=1,
                                       num_unavailable_nodes=0, lost_events=h.lost_to_clients())

    def nodes(self, address: str, tls: bool) -> List[pb.Node]:
        h = self.hub
        return [pb.Node(name=self.node, version=software_version(), address=address, state=pb.Node.NODE_CONNECTED,
                        tls=tls, uptime_seconds=h.uptime(), seen_flows=h.seen_flows)]


def serve_agent(agent, node: str, address: str, tls: Optional[ServerTls] = None, pods_only: bool = False,
                queue_size: int = 4096, ring_size: int = 4096) -> "AgentObserver":
    feed = AgentFeed(agent, node, ring_size=ring_size, queue_size=queue_size, pods_only=pods_only)
    servicer = ObserverServicer(feed.hub, feed.status, lambda: feed.nodes(address, tls is not None))
    server = GrpcServer(servicer, address, tls).start()
    return AgentObserver(feed, server)


@dataclass
class AgentObserver:
    feed: AgentFeed
    server: GrpcServer

    def stop(self) -> None:
        self.server.stop()
        self.feed.close()
