"""The loader's error path on the real kernel: a program the verifier rejects raises BpfError
carrying the errno and the verifier's own log; a missing object and a bad knob are clear
errors too. The bad program is compiled here with the same clang the build uses."""
from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.tcp.structs import TcpconnRodata

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"

BAD_PROGRAM = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("tp/sock/inet_sock_set_state")
int reads_out_of_bounds(void *ctx)
{
	/* dereferences a number as if it were a pointer: the verifier must refuse */
	return *(volatile long *)bpf_get_current_pid_tgid();
}
"""


@pytest.fixture
def bad_object(tmp_path: Path) -> Path:
    src, obj = tmp_path / "bad.bpf.c", tmp_path / "bad.bpf.o"
    src.write_text(BAD_PROGRAM)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", f"-I{INCLUDE}",
                    "-c", str(src), "-o", str(obj)], check=True)
    return obj


def test_verifier_rejection_carries_errno_and_log(bad_object: Path) -> None:
    with bpf.BpfObject(bad_object) as obj:
        with pytest.raises(bpf.BpfError) as info:
            obj.load()
    err = info.value
    assert err.errno == errno.EACCES
    assert "reads_out_of_bounds" in err.log
    assert "invalid mem access 'scalar'" in err.log  # the verifier's own words
    assert "libbpf log" in str(err)


def test_missing_object_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bpf.BpfError) as info:
        bpf.BpfObject(tmp_path / "nope.bpf.o")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError, match="make bpf"):
        bpf.object_path("does-not-exist")


def test_rodata_knobs_are_checked_and_only_before_load() -> None:
    obj = bpf.BpfObject(bpf.object_path("tcpconn"))
    try:
        with pytest.raises(KeyError, match="unknown knob"):
            obj.set_rodata({"no_such_knob": 1}, TcpconnRodata)
        obj.set_rodata({"emit_retransmit_events": 0}, TcpconnRodata)
        view = obj.map("tcpconn.rodata").initial_value()
        assert bytes(view[:1]) == b"\x00"
    finally:
        obj.close()
