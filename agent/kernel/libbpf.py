"""Thin ctypes binding over the distribution's libbpf.so.1.

Bottom of the agent's stack: every other module reaches the kernel through `agent.bpf`, which
wraps these declarations. Only the calls meshlens uses are declared, each with its exact C
signature, so a mismatch shows up as a clear ctypes error rather than memory corruption.
libbpf's log is routed into Python logging; messages printed while an object loads are also
captured so a failed load raises with the verifier's log attached.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Callable, List, Optional

log = logging.getLogger("meshlens.libbpf")

_LIB_NAMES = ("libbpf.so.1", ctypes.util.find_library("bpf") or "libbpf.so")


def _load_library() -> ctypes.CDLL:
    errors = []
    for name in _LIB_NAMES:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError as exc:  # pragma: no cover - depends on the host
            errors.append(f"{name}: {exc}")
    raise OSError("libbpf.so.1 not found (install Debian's libbpf1): " + "; ".join(errors))


lib = _load_library()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_uint32 = ctypes.c_uint32
c_uint64 = ctypes.c_uint64
c_size_t = ctypes.c_size_t
c_bool = ctypes.c_bool

# enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


class BpfMapBatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf 1.x)."""

    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1 layout)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


def _declare(name: str, restype, argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes


_SIGNATURES = {
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__name": (c_char_p, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__section_name": (c_char_p, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, c_bool]),
    "bpf_program__autoload": (c_bool, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_tracepoint": (c_void_p, [c_void_p, c_char_p, c_char_p]),
    "bpf_program__attach_cgroup": (c_void_p, [c_void_p, c_int]),
    "bpf_object__btf": (c_void_p, [c_void_p]),
    "btf__load_vmlinux_btf": (c_void_p, []),
    "btf__find_by_name_kind": (ctypes.c_int32, [c_void_p, c_char_p, c_uint32]),
    "btf__free": (None, [c_void_p]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, ctypes.POINTER(c_size_t)]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_lookup_and_delete_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_uint32), ctypes.POINTER(BpfMapBatchOpts)],
    ),
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(BpfTestRunOpts)]),
    "ring_buffer__new": (c_void_p, [c_int, SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    "ring_buffer__epoll_fd": (c_int, [c_void_p]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _declare(_name, _res, _args)

libc.setns.restype = c_int
libc.setns.argtypes = [c_int, c_int]
libc.vsnprintf.restype = c_int
libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]


class _LogCapture(threading.local):
    """Per-thread list of libbpf messages printed while an object opens or loads."""

    def __init__(self) -> None:
        self.lines: Optional[List[str]] = None
        self.quiet = False


_capture = _LogCapture()


def _print_cb(level: int, fmt: bytes, args: int) -> int:
    # va_list can be consumed once: size the buffer generously (verifier logs are long).
    buf = ctypes.create_string_buffer(1 << 20)
    libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode("utf-8", "replace").rstrip("\n")
    if _capture.lines is not None and level == LIBBPF_WARN:
        _capture.lines.append(text)
    if _capture.quiet:
        log.debug("%s", text)
    elif level == LIBBPF_WARN:
        log.warning("%s", text)
    elif level == LIBBPF_INFO:
        log.info("%s", text)
    else:
        log.debug("%s", text)
    return 0


_PRINT_CB = PRINT_FN(_print_cb)  # kept referenced for the process lifetime
lib.libbpf_set_print(_PRINT_CB)


class capture_log:
    """Context manager collecting libbpf's warnings on this thread (e.g. the verifier log).
    quiet=True keeps them out of the log too: for probes whose failure is an answer."""

    def __init__(self, quiet: bool = False) -> None:
        self._quiet = quiet

    def __enter__(self) -> List[str]:
        self._outer = _capture.lines
        self._outer_quiet = _capture.quiet
        _capture.lines = []
        _capture.quiet = self._quiet or self._outer_quiet
        return _capture.lines

    def __exit__(self, *exc) -> None:
        lines = _capture.lines or []
        _capture.lines = self._outer
        _capture.quiet = self._outer_quiet
        if self._outer is not None:
            self._outer.extend(lines)


def get_errno() -> int:
    return ctypes.get_errno()


def num_possible_cpus() -> int:
    n = lib.libbpf_num_possible_cpus()
    if n <= 0:
        raise OSError(-n, "libbpf_num_possible_cpus failed")
    return n


SampleCallback = Callable[[int, int], int]
