"""`parse_addr()` for the agent's listen address, and a stdlib /metrics-only server.

The agent itself serves /metrics together with the REST API from one ASGI app
(exporter/api/app.py under uvicorn, exporter/api/server.py), rendering with the same text
writer (exporter/prometheus/text_format), so the bytes are identical. This threaded stdlib
server stays for tools that want /metrics alone without FastAPI (tests, comparisons)."""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Protocol, Tuple

from meshlens.exporter.prometheus.text_format import CONTENT_TYPE, render


class Collects(Protocol):
    """A MeshlensCollector, or a whole CollectorRegistry: anything whose collect() yields
    metric families."""

    def collect(self) -> Iterable[object]: ...

log = logging.getLogger("meshlens.http")


def parse_addr(addr: str) -> Tuple[str, int]:
    """'127.0.0.1:9433' or '[::1]:9433' or ':9433' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad listen address {addr!r}: want HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: Tuple[str, int], collector: Collects) -> None:
        if ":" in addr[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.collector = collector


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, ctype, code = render(self.server.collector.collect()), CONTENT_TYPE, 200
            except Exception:  # noqa: BLE001 - a failed scrape is a 500, never a dead agent
                log.exception("rendering /metrics failed")
                body, ctype, code = b"internal error rendering metrics\n", "text/plain", 500
        elif path == "/":
            body, ctype, code = b'meshlens agent: <a href="/metrics">/metrics</a>\n', "text/html", 200
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_metrics(collector: Collects, addr: str) -> Tuple[_Server, threading.Thread]:
    server = _Server(parse_addr(addr), collector)
    thread = threading.Thread(target=server.serve_forever, name="meshlens-http", daemon=True)
    thread.start()
    return server, thread
