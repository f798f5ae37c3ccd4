"""The guest's pure parts without qemu or root: module load order from modules.dep, the
command script handed to the guest, the qemu command line, the check-output parser."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.kernel_matrix.guest_image import GuestImage, ImageError, load_order, module_name, parse_modules_dep
from tests.kernel_matrix.smoke import attach_points
from tests.kernel_matrix.vm import command_script, qemu_argv

# An excerpt of Debian 6.1's modules.dep (depmod lists each module's dependencies).
MODULES_DEP = """\
kernel/fs/9p/9p.ko: kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
"""


def test_load_order_puts_dependencies_first_and_each_module_once() -> None:
    order = [module_name(p) for p in load_order(parse_modules_dep(MODULES_DEP), ["virtio_pci", "9pnet_virtio", "9p"])]
    assert sorted(order) == sorted(set(order))
    for mod, deps in (("virtio_pci", ["virtio", "virtio_ring", "virtio_pci_modern_dev"]),
                      ("9pnet_virtio", ["9pnet", "virtio_ring"]), ("9p", ["netfs", "fscache", "9pnet"])):
        assert all(order.index(d) < order.index(mod) for d in deps), (mod, order)


def test_unknown_module_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="virtio_blk"):
        load_order(parse_modules_dep(MODULES_DEP), ["virtio_blk"])


def test_command_script_quotes_and_keeps_the_exit_code(tmp_path: Path) -> None:
    script = command_script(["sh", "-c", "echo \"$X\" 'it''s'; exit 7"], str(tmp_path), {"X": "a b$c"})
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (7, "a b$c its\n")


def test_qemu_runs_tcg_with_the_root_shared_read_only(tmp_path: Path) -> None:
    img = GuestImage("linux-image-x", "6.1.0-1-amd64", tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "root")
    argv = qemu_argv(img, tmp_path / "out", tmp_path / "console.log")
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert "-enable-kvm" not in argv
    shares = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    assert any("path=/," in s and "readonly=on" in s for s in shares)
    assert any(f"path={tmp_path / 'out'}," in s and "readonly" not in s for s in shares)
    assert f"kmatrix.modroot={tmp_path / 'root'}" in argv[argv.index("-append") + 1]


def test_attach_points_parsed_from_check_output() -> None:
    text = """requirements
------------
√ kprobes available

attach points
-------------
√ tcp/tcp_bytes: fentry+sendpage [a, b] (not tracepoint: no tracepoint sock/sock_send_length)
‼ tcp/x: no attach point
    hint: y

Status check results are √
"""
    assert attach_points(text) == {"tcp/tcp_bytes": "fentry+sendpage [a, b]", "tcp/x": "no attach point"}
