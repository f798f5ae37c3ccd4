"""Serves /metrics over HTTP from a registry (prometheus_client's WSGI server in a thread).
The REST API joins here in a later issue."""
from __future__ import annotations

from typing import Tuple

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry


def parse_addr(addr: str) -> Tuple[str, int]:
    """'127.0.0.1:9433' or '[::1]:9433' or ':9433' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad listen address {addr!r}: want HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(registry: CollectorRegistry, addr: str):
    host, port = parse_addr(addr)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread
