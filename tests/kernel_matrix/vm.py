"""Boots the kernel-matrix guest under qemu (TCG), runs one command in it, returns its result.

Between guest_image.py (kernel, initramfs, modules) and the guest tests. The guest's root
is the host's own root filesystem, shared read-only over virtio-9p, so it runs the same
Python, venv, libbpf, BPF objects, nginx and tools as the host; stage 2 (guest_init.sh)
gives it tmpfs for /run, /tmp and /var/tmp. The command travels as a shell script through
a second, writable 9p share (a fresh temp dir per run); the guest writes stdout, stderr and
the exit code back there and powers off. The serial console is kept as a log for failures.

    python -m tests.kernel_matrix.vm [--timeout S] [--cwd DIR] -- COMMAND [ARG...]
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tests.kernel_matrix.guest_image import GuestImage, ensure_image

QEMU = "qemu-system-x86_64"
STAGE2 = Path(__file__).resolve().with_name("guest_init.sh")
MEMORY_MB = 2048
CPUS = 2
# Passed into the guest unchanged; everything else starts clean.
ENV_KEEP = ("LANG", "LC_ALL", "TERM", "PYTHONPATH", "MESHLENS_LOG_LEVEL")


class GuestError(RuntimeError):
    """The guest did not boot, did not finish in time or did not report an exit code."""


@dataclass
class GuestResult:
    returncode: int
    stdout: str
    stderr: str
    console: str
    seconds: float


def qemu_missing_reason() -> Optional[str]:
    """Why qemu cannot run here, or None if it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (Debian package qemu-system-x86; `make deps` installs it)"
    if os.geteuid() != 0:
        return "the guest shares the host root over 9p and loads BPF: needs root"
    return None


REPO_ROOT = Path(__file__).resolve().parents[2]


def command_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The shell script stage 2 runs: environment, working directory, then exec the command."""
    lines = ["set -e"]
    for k, v in env.items():
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append(f"cd {shlex.quote(cwd)}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def qemu_argv(image: GuestImage, outdir: Path, console: Path) -> list[str]:
    append = " ".join([
        "console=ttyS0", "quiet", "loglevel=4", "panic=-1", "mitigations=off", "tsc=reliable",
        f"kmatrix.stage2={STAGE2}", f"kmatrix.modroot={image.module_root}", f"kmatrix.repo={REPO_ROOT}",
    ])
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-machine", "q35",
        "-m", str(MEMORY_MB), "-smp", str(CPUS),
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
        "-no-reboot", "-nic", "none",
        "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={outdir},mount_tag=kmout,security_model=none,multidevs=remap",
        # the checkout (and its .venv) again on its own: under /tmp (a CI clone) the guest's
        # tmpfs on /tmp would hide it
        "-virtfs", f"local,path={REPO_ROOT},mount_tag=kmrepo,security_model=none,readonly=on,multidevs=remap",
    ]


def run_in_guest(
    argv: Sequence[str],
    *,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 600.0,
    image: Optional[GuestImage] = None,
) -> GuestResult:
    """Boot the guest, run argv in it as root (cwd defaults to the host's), power off."""
    image = image or ensure_image()
    base_env = {
        "PATH": os.path.dirname(sys.executable) + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/run/kmatrix/home",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    base_env.update({k: os.environ[k] for k in ENV_KEEP if k in os.environ})
    base_env.update(env or {})
    workdir = Path(tempfile.mkdtemp(prefix="meshlens-kmatrix-"))
    try:
        outdir = workdir / "out"
        outdir.mkdir()
        (outdir / "cmd.sh").write_text(command_script(argv, cwd or os.getcwd(), base_env))
        console = workdir / "console.log"
        start = time.monotonic()
        try:
            proc = subprocess.run(qemu_argv(image, outdir, console), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"guest did not finish within {timeout:.0f}s; console:\n{_tail(console)}") from None
        seconds = time.monotonic() - start
        rc_file = outdir / "rc"
        if not rc_file.exists():
            raise GuestError(f"guest reported no exit code (qemu exit {proc.returncode}: {proc.stderr.strip()}); "
                             f"console:\n{_tail(console)}")
        return GuestResult(
            returncode=int(rc_file.read_text().strip()),
            stdout=_read(outdir / "stdout"),
            stderr=_read(outdir / "stderr"),
            console=_read(console),
            seconds=seconds,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, n: int = 4000) -> str:
    return _read(path)[-n:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--cwd", default=None)
    p.add_argument("--console", action="store_true", help="print the serial console log to stderr")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        p.error("no command given")
    reason = qemu_missing_reason()
    if reason:
        print(f"kernel-matrix guest cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        res = run_in_guest(argv, cwd=a.cwd, timeout=a.timeout)
    except GuestError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if a.console:
        sys.stderr.write(res.console)
    print(f"[guest exit {res.returncode} after {res.seconds:.1f}s]", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
