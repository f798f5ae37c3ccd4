"""Packet L7 source: loads bpf/l7pkt.bpf.c (HTTP/1.x and DNS parsed from the packets at each
pod's host-side veth) and attaches its two tc programs beside tc.bpf.c's on every pod veth.

link notifications (agent/sources/tc/link_watch.py) -> attach (agent/sources/tc/attach.py,
filters `meshlens-tc-l7-{ingress,egress}`) + `pkt_ifaces[ifindex] = pod netns` -> kernel
`http_stats` / `l7_events` / `l7_counters` (the same maps as l7.bpf.c) -> this module, which
reads them exactly as HttpSource does -> HttpSnapshot (area "http"); DNS records go to the same
DnsTracker (agent/sources/l7/dns.py) -> DnsSnapshot (area "dns"). DNS is paired in the kernel
(`dns_pending`): only answered lookups arrive, with their latency; this module's sweep expires
queries waiting longer than the tracker's timeout (counted unanswered) and hands the kernel's
DNS counters to the tracker.

Series from packets carry cgroup_id 0 and an empty process name (a packet names no process):
the pod is its network namespace, which the identity layer resolves.

With a TcChain (agent/sources/tc/chain.py, given by the runner when the tc source runs too)
the two programs attach no filters: the tc counter programs tail-call them, one filter per
hook. Without one they sit in their own filters right behind the counters'. Chained, a pod is
claimed for the packet path (`on_pod_netns(netns, True)`: the other path skips it) only once
the chain says the counter filters are on its veth; a veth the tc source could not attach to
is counted in `attach_errors` and left to the other path.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Set

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.attach import load_with_fallback
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.base import AttachChoice, Source, SourceHealth
from meshlens.agent.sources.l7.http import HttpConfig, HttpSource
from meshlens.agent.sources.l7.dns import conn_key_hash
from meshlens.agent.sources.l7.structs import L7PktRodata, MlDnsPending, MlPktConnKey, MlPktIface
from meshlens.agent.sources.tc.attach import FILTER_PRIO, TcAttacher
from meshlens.agent.sources.tc.chain import TcChain
from meshlens.agent.sources.tc.link_watch import KIND_POD_VETH, LinkInfo, LinkWatcher, NetnsResolver

if TYPE_CHECKING:
    from meshlens.agent.sources.l7.dns import DnsTracker

log = logging.getLogger("meshlens.http")

PROGRAMS = {"ingress": "meshlens_l7_in", "egress": "meshlens_l7_eg"}
L7_FILTER_PRIO = FILTER_PRIO + 1   # right after the interface counters (which return UNSPEC)


class PacketHttpSource(HttpSource):
    """HttpSource whose kernel half is l7pkt.bpf.o on the pod veths instead of syscalls."""

    def __init__(self, config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None,
                 on_pod_netns: Optional[Callable[[int, bool], None]] = None, watch: bool = True,
                 dns: Optional["DnsTracker"] = None) -> None:
        super().__init__(config, features, dns)
        self.watch = watch
        self.on_pod_netns = on_pod_netns   # (netns inode, covered?) for the syscall path's exclusion
        self.attacher: Optional[TcAttacher] = None
        self.watcher: Optional[LinkWatcher] = None
        self.resolver = NetnsResolver()
        self._lock = threading.Lock()
        self.interfaces: Dict[int, int] = {}   # ifindex -> pod netns inode
        self._claimed: Dict[int, int] = {}     # ifindex -> pod netns this path parses (told on_pod_netns)
        self._unfiltered: Set[int] = set()     # chained, on veths the tc source failed to attach to
        self.attach_errors = 0
        self.chain: Optional[TcChain] = None   # set before start: run from the tc filters
        self.shared_conns: Optional[bpf.Map] = None   # set before start: another object's pkt_conns
        self.chained = False

    def use_tc_chain(self, chain: TcChain) -> None:
        """Run from the tc counter programs (a tail call) instead of filters of our own."""
        self.chain = chain

    def _configure(self, obj: bpf.BpfObject) -> None:
        obj.map("pkt_conns").max_entries = self.config.conns_max_entries
        if self.shared_conns is not None:   # one connection table for both packet entries
            obj.map("pkt_conns").reuse_fd(self.shared_conns.fd)
        obj.map("http_stats").max_entries = self.config.stats_max_entries
        obj.map("l7_events").max_entries = self.config.ringbuf_bytes
        obj.map("dns_pending").max_entries = self.dns.max_pending
        # chained: run only from the tc counters, which hand over the parsed headers in skb->cb
        obj.set_rodata({"sample_every": self.config.sample_every, "tc_chained": int(self.chain is not None)},
                       L7PktRodata)

    def start(self) -> None:
        self.obj, self._choices = load_with_fallback(bpf.object_path("l7pkt"), (), self.features, self._configure)
        try:
            self._rb = bpf.RingBuffer(self.obj.map("l7_events"), self._on_event)
            fds = {d: self.obj.program(p).fd for d, p in PROGRAMS.items()}
            if self.chain:
                self.chain.listen(self._tc_attached)
                self.chain.chain(fds)
                self.chained = True
            else:
                self.attacher = TcAttacher(fds, prio=L7_FILTER_PRIO, kind="l7")
            variant = "tc_chained" if self.chained else "tc_packets"
            self._choices = [AttachChoice("l7_payload", variant, list(PROGRAMS.values())),
                             AttachChoice("dns_packets", variant, list(PROGRAMS.values()))]
            if self.watch:
                self.watcher = LinkWatcher(self.link_up, self.link_gone, None)
                self.watcher.start()
                self.watcher.ready.wait(10)
        except Exception:
            self.stop()
            raise
        log.info("l7: HTTP/DNS from packets on pod veths (tc %s%s)", ", ".join(PROGRAMS.values()),
                 ", tail-called by the tc counters" if self.chained else "")

    def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()
            self.watcher = None
        if self.chained and self.chain:
            self.chain.unlisten(self._tc_attached)
            self.chain.unchain()
            self.chained = False
        if self.attacher:
            self.attacher.detach_all()
            self.attacher = None
        super().stop()

    # ---- links (watcher thread) ------------------------------------------------------
    def link_up(self, link: LinkInfo) -> None:
        """A pod veth: attach, then let the programs parse it (pkt_ifaces names its pod)."""
        if link.kind != KIND_POD_VETH or not (self.attacher or self.chained) or not self.obj:
            return
        netns = self.resolver.resolve(link.peer_netnsid) if link.peer_netnsid >= 0 else 0
        try:
            if self.attacher:   # chained: the tc source's filters on this veth run us
                self.attacher.attach(link.ifindex, link.name)
        except Exception as exc:  # noqa: BLE001 - counted and logged per interface
            self.attach_errors += 1
            log.warning("l7: cannot attach to %s: %s", link.name, exc)
            return
        try:
            self.obj.map("pkt_ifaces").update_raw(link.ifindex.to_bytes(4, "little"), bytes(MlPktIface(netns, 0)))
        except bpf.BpfError as exc:
            self.attach_errors += 1
            log.warning("l7: pkt_ifaces: %s", exc)
            return
        with self._lock:
            self.interfaces[link.ifindex] = netns
            # chained, the parser runs only where the tc source's filters are: wait for them
            ready = not self.chained or (self.chain is not None and self.chain.attached(link.ifindex) is True)
            if ready:
                self._claim(link.ifindex)
        if not ready and self.chain is not None and self.chain.attached(link.ifindex) is False:
            self._tc_attached(link.ifindex, False)

    def _tc_attached(self, ifindex: int, attached: bool) -> None:
        """The chain's word on a veth (tc source's thread): claim its pod, or leave it."""
        with self._lock:
            if ifindex not in self.interfaces or ifindex in self._claimed:
                return
            if attached:
                self._claim(ifindex)
                return
            if ifindex in self._unfiltered:
                return
            self._unfiltered.add(ifindex)
            self.attach_errors += 1
        log.warning("l7: no tc filters on ifindex %d: its pod's traffic is left to the %s path", ifindex,
                    "other" if self.on_pod_netns else "no L7")

    def _claim(self, ifindex: int) -> None:
        """(with self._lock) this path parses the veth's pod: the other path skips it."""
        netns = self.interfaces[ifindex]
        self._claimed[ifindex] = netns
        if netns and self.on_pod_netns:
            self.on_pod_netns(netns, True)

    def link_gone(self, ifindex: int) -> None:
        if self.attacher:
            self.attacher.forget(ifindex)
        with self._lock:
            self.interfaces.pop(ifindex, None)
            self._unfiltered.discard(ifindex)
            netns = self._claimed.pop(ifindex, None)
        if self.obj:
            self.obj.map("pkt_ifaces").delete_raw(ifindex.to_bytes(4, "little"))
        if netns and self.on_pod_netns:
            self.on_pod_netns(netns, False)

    def sweep(self, now_ns: int) -> None:
        super().sweep(now_ns)
        if not self.obj:
            return
        self._expire_dns(time.monotonic_ns())
        k = self.kernel_counters()
        self.dns.kernel_totals(self, {"queries": k.get("dns_queries", 0), "unmatched": k.get("dns_unmatched", 0),
                                      "malformed": k.get("dns_malformed", 0),
                                      "unanswered": k.get("dns_pending_full", 0)})

    def _expire_dns(self, now_ns: int) -> None:
        """Queries waiting in the kernel longer than the timeout: deleted, counted unanswered
        (kernel timestamps and now_ns share CLOCK_MONOTONIC)."""
        assert self.obj is not None
        m = self.obj.map("dns_pending")
        for kraw, vraw in m.items_raw():
            if now_ns - MlDnsPending.from_buffer_copy(vraw).ts_ns >= self.dns.timeout_ns and m.delete_raw(kraw):
                self.dns.unanswered += 1
                if self.dns.followed:   # name it for the flow stream (struct ml_dns_pending_key)
                    conn = ctypes.sizeof(MlPktConnKey)
                    self.dns.kernel_expired(conn_key_hash(kraw[:conn]), int.from_bytes(kraw[conn:conn + 2], "little"),
                                            now_ns)

    def health(self) -> SourceHealth:
        h = super().health()
        h.kernel_counters["attach_errors"] = self.attach_errors
        h.map_entries["pkt_ifaces"] = len(self.interfaces)
        return h


def packet_l7_sources(config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None,
                      on_pod_netns: Optional[Callable[[int, bool], None]] = None) -> List[Source]:
    """The packet HTTP source and the DNS view over the same object, for the runner's list."""
    from meshlens.agent.sources.l7.dns import DnsSource

    http = PacketHttpSource(config, features, on_pod_netns)
    return [http, DnsSource(http)]
