"""cgroup_skb L7 source: loads bpf/l7cg.bpf.c (HTTP/1.x and DNS parsed from the packets of
traffic no pod veth carries) and attaches its ingress and egress programs to the cgroup v2 root.

cgroup v2 root (every socket of the node) -> kernel `http_stats` / `l7_events` / `l7_counters`
(the same maps and core as the tc packet path, bpf/include/l7pkt_core.h) -> this module, which
reads them exactly as PacketHttpSource does (and pairs DNS in the kernel the same way) ->
HttpSnapshot / DnsSnapshot. Sockets of a pod whose veth the tc path parses are registered with
`cover_netns` (map `pkt_netns`) and skipped unless the packet's device is loopback, so every
request is counted once per side.

Series carry the socket's cgroup id, netns and process: the name of the task that created the
socket, which the cgroup/sock_create program on the same root (`SOCK_PROGRAM`) keeps per socket
(accepted sockets inherit their listener's). Sockets older than the agent are named once at
start in two passes: an iterator over every task's open files (`OWNERS_PROGRAM`,
iter/task_file) finds each TCP socket's first holder, then iter/tcp in every netns
(`OLD_SOCKS_PROGRAM`) gives the socket that name; a listener named so names what it accepts
from then on. UDP sockets older than the agent stay unnamed. Every socket on a kernel that refuses sock_create (then `meshlens check` says so
under `http/l7_process`), and old ones where the iterator is refused, have an empty `process`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional, Tuple

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel.bpf import BpfError
from meshlens.agent.kernel.bpf_iter import attach_iter, read_iter
from meshlens.agent.kernel.netns import NetnsDirectory, in_each
from meshlens.agent.kernel.attach import Variant, load_with_fallback, variant_available
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.base import AttachChoice, SourceHealth
from meshlens.agent.sources.l7.http import HttpConfig
from meshlens.agent.sources.l7.packets import PacketHttpSource
from meshlens.agent.sources.l7.structs import L7CgRodata

if TYPE_CHECKING:
    from meshlens.agent.sources.l7.dns import DnsTracker

log = logging.getLogger("meshlens.http")

PROGRAMS = {"egress": "meshlens_cg_eg", "ingress": "meshlens_cg_in"}   # <16 chars: whole in bpftool
SOCK_PROGRAM = "meshlens_cg_sk"   # cgroup/sock_create: a socket's netns, creator's name, skip
OWNERS_PROGRAM = "meshlens_cg_owners"   # iter/task_file, once at start: old sockets' owners
OLD_SOCKS_PROGRAM = "meshlens_cg_old_socks"   # iter/tcp, once per netns: names those sockets
CHOSEN = "cgroup_skb (cgroup v2 root: loopback, hostNetwork, host processes)"
SOCK_CHOSEN = "cgroup/sock_create (cgroup v2 root: each socket's creator, inherited on accept)"

# What "traffic no pod veth carries" could run on, best first. The socket-level hooks would
# see every socket's bytes without a packet parse per segment; they are only a slot in the
# plan: this kernel has neither kprobes nor fentry, and no object implements them yet.
SOCKET_HOOK_VARIANTS: Tuple[Variant, ...] = (
    Variant("fentry tcp_sendmsg/tcp_recvmsg", "fentry", (), ("tcp_sendmsg", "tcp_recvmsg")),
    Variant("kprobe tcp_sendmsg/tcp_recvmsg", "kprobe", (), ("tcp_sendmsg", "tcp_recvmsg")),
)


def socket_hook_reasons(features: KernelFeatures) -> List[str]:
    """Why each socket-level variant before cgroup_skb in the plan is not used here."""
    out = []
    for v in SOCKET_HOOK_VARIANTS:
        ok, why = variant_available(v, features)
        out.append(f"{v.name}: {'not built in this release' if ok else why}")
    return out


def cgroup2_root() -> str:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    raise FileNotFoundError("no cgroup2 mount in /proc/mounts: cgroup_skb needs cgroup v2")


class CgroupHttpSource(PacketHttpSource):
    """The packet path's reader over l7cg.bpf.o on the cgroup v2 root instead of tc on veths
    (no link watch: one attach point covers every socket)."""

    def __init__(self, config: HttpConfig = HttpConfig(), features: Optional[KernelFeatures] = None,
                 dns: Optional["DnsTracker"] = None, cgroup_root: Optional[str] = None,
                 test_netns: int = 0) -> None:
        super().__init__(config, features, on_pod_netns=None, watch=False, dns=dns)
        self.cgroup_root = cgroup_root
        self.test_netns = test_netns   # BPF_PROG_TEST_RUN only (l7cg.bpf.c's test_netns)
        self.sock_refused: Optional[str] = None   # why SOCK_PROGRAM is not in use, if it is not
        self.old_socks_refused: Optional[str] = None   # why OLD_SOCKS_PROGRAM did not run, if it did not
        self.old_socks_named = 0   # sockets older than the agent it named at start
        self._with_sock = True
        self._with_iter = True

    def _configure(self, obj: bpf.BpfObject) -> None:
        super()._configure(obj)
        obj.program(SOCK_PROGRAM).autoload = self._with_sock
        obj.program(OWNERS_PROGRAM).autoload = self._with_sock and self._with_iter
        obj.program(OLD_SOCKS_PROGRAM).autoload = self._with_sock and self._with_iter
        obj.set_rodata({"sample_every": self.config.sample_every, "test_netns": self.test_netns}, L7CgRodata)

    def _load(self) -> bpf.BpfObject:
        """The object with SOCK_PROGRAM, or without it if the kernel refuses it (sk_storage or
        the current-task helpers in cgroup/sock_create): packets are still parsed, unnamed."""
        # (sock_create + the start-up iterators), then without the iterators, then packets alone
        for with_sock, with_iter in ((True, True), (True, False)):
            self._with_sock, self._with_iter = with_sock, with_iter
            try:
                obj, _ = load_with_fallback(bpf.object_path("l7cg"), (), self.features, self._configure)
                return obj
            except BpfError as exc:
                if with_iter:
                    self.old_socks_refused = f"load refused ({exc.strerror or exc})"
                    log.warning("l7: iterators refused, sockets older than the agent name no process: %s", exc)
                else:
                    self.sock_refused = f"load refused ({exc.strerror or exc})"
                    log.warning("l7: cgroup/sock_create refused, series from cgroup_skb name no process: %s", exc)
        self._with_sock = False
        obj, _ = load_with_fallback(bpf.object_path("l7cg"), (), self.features, self._configure)
        return obj

    def start(self) -> None:
        root = self.cgroup_root or cgroup2_root()
        self.sock_refused = self.old_socks_refused = None
        self.obj = self._load()
        try:
            if self._with_sock:
                try:   # before the packet programs: sockets created from now on are named
                    self.obj.attach_cgroup(SOCK_PROGRAM, root)
                except BpfError as exc:
                    self.sock_refused = f"attach refused ({exc.strerror or exc})"
                    log.warning("l7: cgroup/sock_create not attached, series name no process: %s", exc)
            for prog in PROGRAMS.values():
                self.obj.attach_cgroup(prog, root)
            if self._with_sock and self.sock_refused is None and self._with_iter:
                self._name_old_sockets()   # after sock_create: a socket is either seen there or here
            self._rb = bpf.RingBuffer(self.obj.map("l7_events"), self._on_event)
            for netns in list(self._covered):
                self._write_covered(netns, True)
        except Exception:
            self.stop()
            raise
        progs = list(PROGRAMS.values())
        tried = socket_hook_reasons(self.features)
        self._choices = [AttachChoice("l7_payload", "cgroup_skb", progs, tried=tried),
                         AttachChoice("dns_packets", "cgroup_skb", progs)]
        if self.sock_refused is None:
            if self.old_socks_refused is None:
                self._choices.append(AttachChoice("l7_process", SOCK_CHOSEN, [SOCK_PROGRAM, OWNERS_PROGRAM, OLD_SOCKS_PROGRAM]))
            else:
                self._choices.append(AttachChoice(
                    "l7_process", SOCK_CHOSEN, [SOCK_PROGRAM],
                    tried=[f"iter/task_file: {self.old_socks_refused}; sockets older than the agent have "
                           "an empty process"]))
        else:
            self._choices.append(AttachChoice("l7_process", None, [SOCK_PROGRAM], required=False,
                                              tried=[f"cgroup/sock_create: {self.sock_refused}; "
                                                     "series from cgroup_skb have an empty process"]))
        log.info("l7: HTTP/DNS from packets on cgroup %s (cgroup_skb %s)", root, ", ".join(progs))

    def _name_old_sockets(self) -> None:
        """The owners of every TCP socket (one pass over all tasks' files), then the sockets
        themselves in each netns (iter/tcp shows its reader's only): each byte the second
        writes is one socket named. The owners map is emptied after: it is needed only here."""
        assert self.obj is not None
        try:
            read_iter(attach_iter(self.obj, OWNERS_PROGRAM))
            link = attach_iter(self.obj, OLD_SOCKS_PROGRAM)
            netns = NetnsDirectory()
            out, missed = in_each(netns.scan(), netns.own, lambda: read_iter(link))
        except (BpfError, OSError) as exc:
            self.old_socks_refused = f"not run ({getattr(exc, 'strerror', None) or exc})"
            log.warning("l7: sockets older than the agent not named (iterators: %s)", exc)
            return
        finally:
            owners = self.obj.map("old_owners")
            for k in list(owners.keys_raw()):
                owners.delete_raw(k)
        self.old_socks_named = sum(len(b) for b in out)
        log.info("l7: named %d sockets older than the agent (%d netns, %d gone before they were read)",
                 self.old_socks_named, len(out), missed)

    def health(self) -> SourceHealth:
        h = super().health()
        h.kernel_counters.pop("attach_errors", None)
        h.kernel_counters["old_sockets_named"] = self.old_socks_named
        h.map_entries.pop("pkt_ifaces", None)
        h.map_entries["pkt_netns"] = len(self._covered)
        return h
