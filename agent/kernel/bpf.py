"""Object model over libbpf: BpfObject -> Program / Map / Link / RingBuffer.

The agent's sources (e.g. agent/sources/tcp/source.py) use this to open a compiled object shipped in
agent/bpfobj, set its rodata knobs and map sizes before load, attach the programs chosen by
agent/kernel/attach.py, sweep maps and poll ring buffers. Failures raise BpfError with the errno and
whatever libbpf logged (the verifier log on a failed load).
"""
from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

from meshlens.agent.kernel import libbpf
from meshlens.agent.kernel.libbpf import lib

log = logging.getLogger("meshlens.bpf")

OBJ_DIR = Path(__file__).resolve().parent.parent / "bpfobj"

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}

T = TypeVar("T", bound=ctypes.Structure)


class BpfError(OSError):
    """A libbpf or bpf() failure, with errno and the log libbpf printed (verifier output)."""

    def __init__(self, what: str, err: int, log_lines: Optional[List[str]] = None) -> None:
        err = abs(err) if err else errno_mod.EINVAL
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.log = "\n".join(log_lines or [])

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n--- libbpf log ---\n{self.log}" if self.log else base


def object_path(name: str) -> Path:
    """Path of a compiled object shipped with the package, e.g. object_path('tcpconn')."""
    path = OBJ_DIR / f"{name}.bpf.o"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build with `make bpf` or reinstall meshlens")
    return path


class Link:
    """An attached program. destroy() detaches; idempotent."""

    def __init__(self, ptr: int, program: str) -> None:
        self._ptr: Optional[int] = ptr
        self.program = program

    @property
    def fd(self) -> int:
        return lib.bpf_link__fd(self._ptr) if self._ptr else -1

    def destroy(self) -> None:
        if self._ptr:
            lib.bpf_link__destroy(self._ptr)
            self._ptr = None


class Program:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name: str = lib.bpf_program__name(ptr).decode()
        self.section: str = lib.bpf_program__section_name(ptr).decode()

    @property
    def autoload(self) -> bool:
        return bool(lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        err = lib.bpf_program__set_autoload(self._ptr, value)
        if err:
            raise BpfError(f"set_autoload({self.name})", err)

    @property
    def fd(self) -> int:
        return lib.bpf_program__fd(self._ptr)

    def attach(self) -> Link:
        """Attach by section name (tracepoint, fentry, kprobe...)."""
        with libbpf.capture_log() as lines:
            ptr = lib.bpf_program__attach(self._ptr)
        if not ptr:
            raise BpfError(f"attach {self.name} ({self.section})", libbpf.get_errno(), lines)
        return Link(ptr, self.name)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        """Attach to a named tracepoint, whatever the section says: one program can serve
        many tracepoints (libbpf's section-based attach covers only one)."""
        with libbpf.capture_log() as lines:
            ptr = lib.bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode())
        if not ptr:
            raise BpfError(f"attach {self.name} to {category}/{name}", libbpf.get_errno(), lines)
        return Link(ptr, self.name)

    def attach_cgroup(self, path: str) -> Link:
        """Attach to a cgroup v2 directory (cgroup_skb, cgroup_sock...) with a BPF link, so it
        runs beside other programs there and goes when the link (or this process) does."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with libbpf.capture_log() as lines:
                ptr = lib.bpf_program__attach_cgroup(self._ptr, fd)
        finally:
            os.close(fd)
        if not ptr:
            raise BpfError(f"attach {self.name} to cgroup {path}", libbpf.get_errno(), lines)
        return Link(ptr, self.name)

    def run(self) -> int:
        """BPF_PROG_TEST_RUN without input (raw_tp, syscall programs): run the program once,
        now, in this thread; returns its return value."""
        opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts))
        err = lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if err:
            raise BpfError(f"run {self.name}", libbpf.get_errno() or err)
        return opts.retval

    def test_run(self, data: bytes, repeat: int = 1, out_size: int = 0, ctx: bytes = b"") -> Tuple[int, bytes, int]:
        """BPF_PROG_TEST_RUN: (return value, output packet, duration ns). ctx: the program's
        context to start from (for sched_cls a struct __sk_buff prefix: cb, mark, ...)."""
        buf_in = ctypes.create_string_buffer(data, len(data))
        buf_out = ctypes.create_string_buffer(max(out_size, len(data) + 256))
        opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts))
        opts.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
        opts.data_size_in = len(data)
        opts.data_out = ctypes.cast(buf_out, ctypes.c_void_p)
        opts.data_size_out = len(buf_out)
        opts.repeat = repeat
        if ctx:
            buf_ctx = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in = ctypes.cast(buf_ctx, ctypes.c_void_p)
            opts.ctx_size_in = len(ctx)
        err = lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if err:
            raise BpfError(f"test_run {self.name}", libbpf.get_errno() or err)
        return opts.retval, buf_out.raw[: opts.data_size_out], opts.duration


class Map:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name: str = lib.bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return lib.bpf_map__fd(self._ptr)

    @property
    def type(self) -> int:
        return lib.bpf_map__type(self._ptr)

    @property
    def key_size(self) -> int:
        return lib.bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib.bpf_map__value_size(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        err = lib.bpf_map__set_max_entries(self._ptr, n)
        if err:
            raise BpfError(f"set_max_entries({self.name}, {n})", err)

    def reuse_fd(self, fd: int) -> None:
        """Before load: use the loaded map behind fd (another object's) instead of creating
        one; the kernel checks at load that type, key, value and size match."""
        err = lib.bpf_map__reuse_fd(self._ptr, fd)
        if err:
            raise BpfError(f"reuse_fd({self.name})", libbpf.get_errno() or err)

    def initial_value(self) -> ctypes.Array:
        """Writable view of a global-data map (.rodata, .bss) before load."""
        size = ctypes.c_size_t()
        ptr = lib.bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not ptr:
            raise BpfError(f"initial_value({self.name})", errno_mod.EINVAL)
        return (ctypes.c_char * size.value).from_address(ptr)

    # -- element access (after load) ------------------------------------------------------
    def _value_buffer_size(self) -> int:
        if self.type in _PERCPU_TYPES:
            return ((self.value_size + 7) // 8 * 8) * libbpf.num_possible_cpus()
        return self.value_size

    def lookup_raw(self, key: bytes) -> Optional[bytes]:
        val = ctypes.create_string_buffer(self._value_buffer_size())
        err = lib.bpf_map_lookup_elem(self.fd, key, val)
        if err:
            e = libbpf.get_errno()
            if e == errno_mod.ENOENT:
                return None
            raise BpfError(f"lookup {self.name}", e)
        return val.raw

    def update_raw(self, key: bytes, value: bytes, flags: int = 0) -> None:
        err = lib.bpf_map_update_elem(self.fd, key, value, flags)
        if err:
            raise BpfError(f"update {self.name}", libbpf.get_errno())

    def delete_raw(self, key: bytes) -> bool:
        err = lib.bpf_map_delete_elem(self.fd, key)
        if err:
            e = libbpf.get_errno()
            if e == errno_mod.ENOENT:
                return False
            raise BpfError(f"delete {self.name}", e)
        return True

    def lookup_and_delete_raw(self, key: bytes) -> Optional[bytes]:
        """Atomically read and remove one element (hash maps, 5.14+); None if absent."""
        val = ctypes.create_string_buffer(self._value_buffer_size())
        err = lib.bpf_map_lookup_and_delete_elem(self.fd, key, val)
        if err:
            e = libbpf.get_errno()
            if e == errno_mod.ENOENT:
                return None
            raise BpfError(f"lookup_and_delete {self.name}", e)
        return val.raw

    def keys_raw(self) -> Iterator[bytes]:
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        prev = None
        while True:
            err = lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if err:
                e = libbpf.get_errno()
                if e == errno_mod.ENOENT:
                    return
                raise BpfError(f"get_next_key {self.name}", e)
            yield nxt.raw
            ctypes.memmove(key, nxt, self.key_size)
            prev = key

    def items_raw(self, batch: int = 1024) -> List[Tuple[bytes, bytes]]:
        """All (key, value) pairs: bpf_map_lookup_batch where supported, else key walk."""
        try:
            return self._items_batch(batch)
        except BpfError as exc:
            if exc.errno not in (errno_mod.EINVAL, errno_mod.ENOTSUPP if hasattr(errno_mod, "ENOTSUPP") else 524, 524):
                raise
        out = []
        for k in self.keys_raw():
            v = self.lookup_raw(k)
            if v is not None:
                out.append((k, v))
        return out

    def _items_batch(self, batch: int) -> List[Tuple[bytes, bytes]]:
        ks, vs = self.key_size, self._value_buffer_size()
        keys = ctypes.create_string_buffer(ks * batch)
        vals = ctypes.create_string_buffer(vs * batch)
        in_b = ctypes.create_string_buffer(max(ks, 8))
        out_b = ctypes.create_string_buffer(max(ks, 8))
        opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts))
        out: List[Tuple[bytes, bytes]] = []
        first = True
        while True:
            count = ctypes.c_uint32(batch)
            err = lib.bpf_map_lookup_batch(
                self.fd, None if first else in_b, out_b, keys, vals, ctypes.byref(count), ctypes.byref(opts)
            )
            e = libbpf.get_errno() if err else 0
            if err and e != errno_mod.ENOENT:
                raise BpfError(f"lookup_batch {self.name}", e)
            raw_k, raw_v = keys.raw, vals.raw
            for i in range(count.value):
                out.append((raw_k[i * ks:(i + 1) * ks], raw_v[i * vs:(i + 1) * vs]))
            if err:  # ENOENT: that was the last batch
                return out
            ctypes.memmove(in_b, out_b, len(out_b))
            first = False

    def items(self, key_type: Type[ctypes._SimpleCData] | Type[T], value_type: Type[T]) -> List[Tuple[object, T]]:
        out = []
        for k, v in self.items_raw():
            key = key_type.from_buffer_copy(k)
            out.append((getattr(key, "value", key), value_type.from_buffer_copy(v)))
        return out

    def percpu_u64_sums(self) -> List[int]:
        """For a PERCPU_ARRAY of u64: the per-index sum over CPUs."""
        ncpu = libbpf.num_possible_cpus()
        sums = []
        for idx in range(self.max_entries):
            raw = self.lookup_raw(bytes(ctypes.c_uint32(idx)))
            vals = (ctypes.c_uint64 * ncpu).from_buffer_copy(raw[: 8 * ncpu]) if raw else []
            sums.append(sum(vals))
        return sums


class RingBuffer:
    """Polls one BPF ring buffer, handing each record's bytes to a Python callback.

    A callback that raises is logged and counted (callback_errors), never propagated into
    libbpf. poll() returns the number of records consumed; an interrupted poll returns 0.
    consume(budget) hands over at most `budget` records and leaves the rest in the buffer, so
    a flood of records cannot keep the caller from its other work (the sweep): the sample
    callback returns a negative value after the budget's last record, which makes libbpf
    (1.1 has no ring_buffer__consume_n) store the consumer position past it and stop.
    """

    def __init__(self, m: Map, callback: Callable[[bytes], None]) -> None:
        self.records = 0
        self.callback_errors = 0
        self.budget_stops = 0          # consume() calls that stopped at their budget
        self._callback = callback
        self._left = -1                # records this consume() may still hand over; -1: no budget

        def _sample(_ctx: int, data: int, size: int) -> int:
            self.records += 1
            try:
                self._callback(ctypes.string_at(data, size))
            except Exception:  # noqa: BLE001 - a bad record must not stop the agent
                self.callback_errors += 1
                log.exception("ring buffer %s: callback failed", m.name)
            if self._left > 0:
                self._left -= 1
                if self._left == 0:
                    return -errno_mod.EAGAIN  # this record is consumed; stop before the next
            return 0

        self._sample = libbpf.SAMPLE_FN(_sample)
        ptr = lib.ring_buffer__new(m.fd, self._sample, None, None)
        if not ptr:
            raise BpfError(f"ring_buffer__new({m.name})", libbpf.get_errno())
        self._ptr: Optional[int] = ptr

    def poll(self, timeout_ms: int) -> int:
        n = lib.ring_buffer__poll(self._ptr, timeout_ms)
        if n < 0:
            if -n == errno_mod.EINTR:
                return 0
            raise BpfError("ring_buffer__poll", -n)
        return n

    def consume(self, budget: Optional[int] = None) -> int:
        """Hand over the waiting records, at most `budget` of them (all when None); returns
        how many were handed over."""
        before = self.records
        self._left = budget if budget and budget > 0 else -1
        try:
            n = lib.ring_buffer__consume(self._ptr)
        finally:
            stopped, self._left = self._left == 0, -1
        if n < 0:
            if stopped and -n == errno_mod.EAGAIN:
                self.budget_stops += 1
                return self.records - before
            raise BpfError("ring_buffer__consume", -n)
        return n

    def epoll_fd(self) -> int:
        """libbpf's epoll fd for this buffer: readable when records are waiting."""
        return lib.ring_buffer__epoll_fd(self._ptr) if self._ptr else -1

    def free(self) -> None:
        if self._ptr:
            lib.ring_buffer__free(self._ptr)
            self._ptr = None


class _OpenOpts(ctypes.Structure):
    """The head of libbpf's struct bpf_object_open_opts, up to btf_custom_path (libbpf reads
    only `sz` bytes of it, so a shorter struct from an older header is valid)."""

    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p), ("relaxed_maps", ctypes.c_bool),
                ("pin_root_path", ctypes.c_char_p), ("_removed_attach_prog_fd", ctypes.c_uint32),
                ("kconfig", ctypes.c_char_p), ("btf_custom_path", ctypes.c_char_p)]


def _open_opts() -> Optional[_OpenOpts]:
    """Without CAP_SYS_ADMIN (the DaemonSet's case) libbpf 1.1 cannot list kernel-module BTFs
    (BPF_BTF_GET_NEXT_ID), and fails a CO-RE relocation whose type is not in vmlinux (an
    optional older layout, checked with bpf_core_type_exists) instead of resolving it to
    "absent". Naming vmlinux BTF as the target makes libbpf search vmlinux only."""
    from meshlens.agent.kernel.capabilities import CAP_NUMBERS, effective

    try:
        if effective() >> CAP_NUMBERS["SYS_ADMIN"] & 1:
            return None
    except (OSError, RuntimeError):
        return None
    opts = _OpenOpts(btf_custom_path=b"/sys/kernel/btf/vmlinux")
    opts.sz = ctypes.sizeof(_OpenOpts)
    return opts


class BpfObject:
    """One compiled .bpf.o: open, configure (knobs, sizes, autoload), load, attach, close."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self.links: List[Link] = []
        opts = _open_opts()
        with libbpf.capture_log() as lines:
            ptr = lib.bpf_object__open_file(str(self.path).encode(), ctypes.byref(opts) if opts is not None else None)
        if not ptr:
            raise BpfError(f"open {self.path}", libbpf.get_errno(), lines)
        self._ptr: Optional[int] = ptr
        self.loaded = False
        self.programs: Dict[str, Program] = {}
        p = lib.bpf_object__next_program(ptr, None)
        while p:
            prog = Program(p)
            self.programs[prog.name] = prog
            p = lib.bpf_object__next_program(ptr, p)
        self.maps: Dict[str, Map] = {}
        m = lib.bpf_object__next_map(ptr, None)
        while m:
            mp = Map(m)
            self.maps[mp.name] = mp
            m = lib.bpf_object__next_map(ptr, m)

    def map(self, name: str) -> Map:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no map {name!r} (has {sorted(self.maps)})") from None

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no program {name!r}") from None

    def set_rodata(self, values: Dict[str, int], struct_type: Type[ctypes.Structure]) -> None:
        """Write `const volatile` knobs before load. struct_type mirrors the .rodata layout."""
        if self.loaded:
            raise RuntimeError("rodata knobs must be set before load")
        ro = self._rodata_map()
        view = ro.initial_value()
        if ctypes.sizeof(struct_type) > len(view):
            raise ValueError(f".rodata is {len(view)} bytes, mirror is {ctypes.sizeof(struct_type)}")
        current = struct_type.from_buffer_copy(bytes(view[: ctypes.sizeof(struct_type)]))
        for key, val in values.items():
            if not hasattr(current, key):
                raise KeyError(f"unknown knob {key!r}")
            setattr(current, key, val)
        ctypes.memmove(ctypes.addressof(view), ctypes.addressof(current), ctypes.sizeof(struct_type))

    def _rodata_map(self) -> Map:
        for name, m in self.maps.items():
            if name.endswith(".rodata"):
                return m
        raise KeyError(f"{self.path.name} has no .rodata")

    def load(self) -> None:
        with libbpf.capture_log() as lines:
            err = lib.bpf_object__load(self._ptr)
        if err:
            raise BpfError(f"load {self.path.name}", libbpf.get_errno() or err, lines)
        self.loaded = True

    def attach(self, name: str) -> Link:
        link = self.program(name).attach()
        self.links.append(link)
        return link

    def attach_tracepoint(self, program: str, category: str, name: str) -> Link:
        link = self.program(program).attach_tracepoint(category, name)
        self.links.append(link)
        return link

    def attach_cgroup(self, program: str, path: str) -> Link:
        link = self.program(program).attach_cgroup(path)
        self.links.append(link)
        return link

    def btf_ptr(self) -> int:
        """libbpf's struct btf * of the opened object (after libbpf's fix-ups), or 0."""
        return lib.bpf_object__btf(self._ptr) or 0

    def detach_all(self) -> None:
        while self.links:
            self.links.pop().destroy()

    def close(self) -> None:
        """Detach every link and free the object (maps and programs go with their fds)."""
        self.detach_all()
        if self._ptr:
            lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
