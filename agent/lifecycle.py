"""Process lifecycle: one agent per node (a lock), cleanup of what a crashed predecessor left
behind (pinned objects under bpffs), and signal handling that turns SIGTERM/SIGINT into an
orderly stop. Tracepoint links die with the process that owns them; pins do not, so they are
cleaned here before anything new is attached (stale tc filters are the tc source's to remove:
agent/sources/tc/attach.py)."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger("meshlens.lifecycle")

DEFAULT_STATE_DIR = Path("/run/meshlens")
PIN_DIR = Path("/sys/fs/bpf/meshlens")


class AlreadyRunning(RuntimeError):
    pass


class InstanceLock:
    """flock on <state_dir>/agent.lock: released by the kernel if the holder dies."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.path = Path(state_dir) / "agent.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(f"another meshlens agent (pid {other or '?'}) holds {self.path}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def cleanup_stale_pins(pin_dir: Path = PIN_DIR) -> int:
    """Remove objects a previous instance pinned; returns how many were removed."""
    if not pin_dir.exists():
        return 0
    n = sum(1 for _ in pin_dir.rglob("*"))
    shutil.rmtree(pin_dir, ignore_errors=True)
    log.warning("removed %d stale pinned objects under %s", n, pin_dir)
    return n


def install_stop_handlers(stop: threading.Event) -> None:
    def _handler(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
