"""BPF iterators (iter/tcp, ...): attach an iterator program once, then read it on demand.

Kernel layer, beside agent/kernel/bpf.py: a source attaches its iterator program here and,
at each sweep, calls read_iter() to run it; the program's bpf_seq_write output comes back as
bytes. Socket iterators walk the network namespace of the thread that calls read_iter() (the
kernel takes the caller's netns when the iterator fd is created), so a source that wants
every pod's sockets calls it from a thread that has entered each namespace in turn.
"""
from __future__ import annotations

import ctypes
import os

from meshlens.agent.kernel import libbpf
from meshlens.agent.kernel.bpf import BpfError, BpfObject, Link
from meshlens.agent.kernel.libbpf import lib

lib.bpf_program__attach_iter.restype = ctypes.c_void_p
lib.bpf_program__attach_iter.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
lib.bpf_iter_create.restype = ctypes.c_int
lib.bpf_iter_create.argtypes = [ctypes.c_int]

READ_CHUNK = 1 << 16
MAX_OUTPUT = 64 << 20  # a runaway iterator is cut off, not read into memory forever


def attach_iter(obj: BpfObject, program: str) -> Link:
    """Attach an iterator program (no per-map or per-task options) and keep the link on obj."""
    prog = obj.program(program)
    with libbpf.capture_log() as lines:
        ptr = lib.bpf_program__attach_iter(prog._ptr, None)
    if not ptr:
        raise BpfError(f"attach iterator {program}", libbpf.get_errno(), lines)
    link = Link(ptr, program)
    obj.links.append(link)
    return link


def read_iter(link: Link) -> bytes:
    """Run the iterator once (in the calling thread's network namespace) and return its output."""
    fd = lib.bpf_iter_create(link.fd)
    if fd < 0:
        raise BpfError(f"bpf_iter_create({link.program})", libbpf.get_errno() or -fd)
    chunks = []
    total = 0
    try:
        while total < MAX_OUTPUT:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
