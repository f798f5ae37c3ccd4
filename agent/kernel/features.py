"""What the running kernel offers: BTF, tracefs, bpffs, tracepoints, kprobes, fentry, memlock.

Probed once at start; agent/kernel/attach.py uses it to order attach variants and `meshlens check`
prints it. Probes look at the kernel itself (tracefs, /proc, a test load), never at a version
number.
"""
from __future__ import annotations

import functools
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meshlens.agent.kernel import bpf
from meshlens.agent.kernel import libbpf

log = logging.getLogger("meshlens.kernel")

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
BPFFS = Path("/sys/fs/bpf")
BTF_KIND_STRUCT = 4
BTF_KIND_FUNC = 12
BTF_KIND_TYPEDEF = 8


def _mounted(path: Path, fstype: str) -> bool:
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == str(path) and line.split()[2] == fstype for line in f)
    except OSError:
        return False


@dataclass
class KernelFeatures:
    release: str
    btf: bool
    tracefs: Optional[Path]
    bpffs: bool
    is_root: bool
    memlock_bytes: int  # RLIM_INFINITY as -1

    @classmethod
    def probe(cls) -> "KernelFeatures":
        tracefs = next((p for p in TRACEFS_CANDIDATES if (p / "events").is_dir()), None)
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return cls(
            release=os.uname().release,
            btf=BTF_PATH.exists(),
            tracefs=tracefs,
            bpffs=_mounted(BPFFS, "bpf"),
            is_root=os.geteuid() == 0,
            memlock_bytes=-1 if soft == resource.RLIM_INFINITY else soft,
        )

    def has_tracepoint(self, category_event: str) -> bool:
        return bool(self.tracefs) and (self.tracefs / "events" / category_event / "id").exists()

    @functools.cached_property
    def kprobes(self) -> bool:
        """kprobe events can be created (CONFIG_KPROBE_EVENTS) through perf or tracefs."""
        return Path("/sys/bus/event_source/devices/kprobe").exists() or bool(
            self.tracefs and (self.tracefs / "kprobe_events").exists()
        )

    @functools.cached_property
    def fentry(self) -> bool:
        """Whether an fentry program loads (needs BTF and a trampoline-capable kernel)."""
        if not self.btf:
            return False
        try:
            with libbpf.capture_log(quiet=True), bpf.BpfObject(bpf.object_path("probe")) as obj:
                obj.load()
            return True
        except (OSError, KeyError) as exc:
            log.info("fentry unavailable: %s", getattr(exc, "strerror", exc))
            return False

    def kernel_btf_function(self, name: str) -> bool:
        """The kernel's BTF has a function of that name: fentry can target it, or, for kfuncs
        such as bpf_rdonly_cast (6.2+), programs can call it."""
        return self._btf_has(name, BTF_KIND_FUNC)

    def btf_tracepoint(self, event: str) -> bool:
        """A tp_btf program can attach to this tracepoint: the kernel's BTF has its
        `btf_trace_<event>` typedef."""
        return self._btf_has(f"btf_trace_{event}", BTF_KIND_TYPEDEF)

    def kernel_btf_struct(self, name: str) -> bool:
        """The kernel's BTF has a struct of that name (e.g. a tracepoint's record type)."""
        return self._btf_has(name, BTF_KIND_STRUCT)

    def _btf_has(self, name: str, kind: int) -> bool:
        memo = self.__dict__.setdefault("_btf_memo", {})
        if (name, kind) not in memo:
            memo[(name, kind)] = self._btf_lookup(name, kind)
        return memo[(name, kind)]

    def _btf_lookup(self, name: str, kind: int) -> bool:
        if not self.btf:
            return False
        btf = libbpf.lib.btf__load_vmlinux_btf()
        if not btf:
            log.info("cannot read kernel BTF: errno %d", libbpf.get_errno())
            return False
        try:
            return libbpf.lib.btf__find_by_name_kind(btf, name.encode(), kind) >= 0
        finally:
            libbpf.lib.btf__free(btf)

    @functools.cached_property
    def bpf_iter(self) -> bool:
        """BPF iterators can be used (they need BTF; whether iter/tcp loads is found at load)."""
        return self.btf

    def kernel_function(self, name: str) -> bool:
        """The function exists as a traceable symbol."""
        try:
            with open("/proc/kallsyms") as f:
                return any(line.rstrip().split(" ")[2:3] == [name] for line in f)
        except OSError:
            return False
