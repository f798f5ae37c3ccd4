"""Runs the agent's one HTTP app (exporter/api/app.py) with uvicorn in a thread: one server,
one port for /metrics, the REST API, the tap stream and the health checks.

Why uvicorn in a thread: FastAPI needs an ASGI server, and the tap is a long-lived stream
that a thread-per-connection stdlib server would hold a thread for; uvicorn's event loop
serves streams and short requests alike, runs sync endpoints (/metrics, flows) in its
thread pool so a slow answer never stalls the loop, and leaves the main thread to the
agent's kernel loop. Access logging is off: no request line (and so no query string) and no
header ever reaches a log.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Optional

import uvicorn

log = logging.getLogger("meshlens.http")


class ApiServer:
    def __init__(self, app: object, host: str, port: int) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc

    def start(self, timeout: float = 10.0) -> "ApiServer":
        """Bind and serve; raises OSError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # a clear error before the thread starts
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((self.host, self.port))
        self._thread = threading.Thread(target=self._run, name="meshlens-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise OSError(f"HTTP server failed to start: {self._error}")
            if time.monotonic() > deadline:
                raise OSError("HTTP server did not start in time")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=2)
