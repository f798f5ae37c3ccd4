"""The live tap: sampled requests as Linkerd's event triple (request_init: method, authority,
route template; response_init: status, latency; response_end: duration, response bytes),
with source and destination pods, filtered like flows and capped at `max_rps`.

Place in the data flow: the first connected client turns kernel sampling on
(agent/runner.Agent.tap_open -> the HTTP source's set_tap_sampling -> the `tap_ctl` map
bpf/include/http_parser.h gives both L7 objects, syscalls and packets); sampled records reach the HttpSnapshot's bounded `tap` deque at each sweep;
this module polls the snapshot, keeps records newer than the client's connection (nothing
older is ever shown), filters them, rate-limits them and yields events; app.py streams them
as Server-Sent Events. The last client to leave turns sampling off again.

The kernel measures a request up to the first byte of its response, so `response_end`'s
`duration_ms` equals `response_init`'s `latency_ms`; response bytes are the body size when
the response said it (Content-Length, chunked), else null. No query string, header or body
is ever part of an event: only the route template.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Deque, Dict, List, Optional, Set, Tuple

from meshlens.agent.identity.model import IdentityView, Workload
from meshlens.exporter.api.filters import FlowFilter
from meshlens.exporter.api.flows import workload_dict

POLL_S = 0.1
SEEN_MAX = 4096   # records remembered as already shown (the snapshot's tap deque holds 1000)
_ids = itertools.count(1)


@dataclass
class RateLimit:
    """Token buckets per source pod; `max_rps` is split evenly across the pods seen so far."""

    max_rps: float
    clock: Callable[[], float] = time.monotonic
    _buckets: Dict[Workload, Tuple[float, float]] = field(default_factory=dict)  # pod -> (tokens, last)

    def allow(self, pod: Workload) -> bool:
        now = self.clock()
        if pod not in self._buckets:
            self._buckets[pod] = (0.0, now)
            share = self.max_rps / len(self._buckets)
            # a new pod takes its share: the others' buckets shrink to the new share
            for p, (tok, last) in list(self._buckets.items()):
                self._buckets[p] = (min(tok, share), last)
            self._buckets[pod] = (max(1.0, share), now)   # a full bucket: one second's share
        share = self.max_rps / len(self._buckets)
        tokens, last = self._buckets[pod]
        tokens = min(max(share, 1.0), tokens + (now - last) * share)
        if tokens >= 1.0:
            self._buckets[pod] = (tokens - 1.0, now)
            return True
        self._buckets[pod] = (tokens, now)
        return False


def _authority(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def tap_events(rec, identity: IdentityView, flt: FlowFilter) -> Optional[Tuple[List[Tuple[str, dict]], Workload]]:
    """The three events of one sampled request, or None when the filter refuses it."""
    key = rec.key
    local = identity.local(key.cgroup_id, key.netns, key.process)
    peer = identity.peer(rec.peer_address) if rec.peer_address else Workload("", "", "unknown", "unknown")
    if key.role == "server":
        src, src_ip, dst, dst_ip, direction = peer, rec.peer_address, local, key.server_address, "inbound"
    else:
        src, src_ip, dst, dst_ip, direction = local, None, peer, key.server_address, "outbound"
    if flt.direction is not None and direction != flt.direction:
        return None
    if flt.port is not None and key.server_port != flt.port:
        return None
    if flt.http_status is not None and not flt.http_status.matches(key.status):
        return None
    if not flt.matches_ends(src, src_ip, dst, dst_ip):
        return None
    rid = next(_ids)
    latency_ms = round(rec.duration_s * 1000.0, 3)
    source = workload_dict(src, src_ip or "")
    destination = workload_dict(dst, dst_ip)
    return [
        ("request_init", {"id": rid, "ts_ns": rec.ts_ns, "direction": direction, "source": source,
                          "destination": destination, "method": key.method,
                          "authority": _authority(key.server_address, key.server_port),
                          "route": key.route or "[DEFAULT]"}),
        ("response_init", {"id": rid, "status": key.status, "latency_ms": latency_ms}),
        ("response_end", {"id": rid, "duration_ms": latency_ms, "response_bytes": rec.response_body,
                          "request_bytes": rec.request_body}),
    ], local


async def stream(tap_records: Callable[[], tuple], identity: IdentityView, flt: FlowFilter, max_rps: float,
                 since_ns: int, until_mono: Optional[float] = None) -> AsyncIterator[Tuple[str, dict]]:
    """Yield (event type, data) for every sampled request newer than `since_ns`
    (CLOCK_MONOTONIC, as the kernel stamps records), until `until_mono` if given."""
    limit = RateLimit(max_rps)
    seen: Set[tuple] = set()
    order: Deque[tuple] = collections.deque()
    while until_mono is None or time.monotonic() < until_mono:
        for rec in tap_records():
            if rec.ts_ns < since_ns:
                continue          # sampled before this client connected: never shown
            ident = (rec.ts_ns, rec.key, rec.duration_s, rec.peer_address)
            if ident in seen:
                continue
            seen.add(ident)
            order.append(ident)
            if len(order) > SEEN_MAX:
                seen.discard(order.popleft())
            got = tap_events(rec, identity, flt)
            if got is None:
                continue
            events, pod = got
            if not limit.allow(pod):
                continue
            for ev in events:
                yield ev
        await asyncio.sleep(POLL_S)
