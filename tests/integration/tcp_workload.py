"""A TCP workload with exactly known numbers, run inside test pods.

server: accept --count connections; from each read exactly --recv bytes, send --send bytes,
        then close (or reset with SO_LINGER 0 when --reset). Prints a JSON summary.
client: make --count connections to HOST:PORT, one after another (or --parallel at a time);
        send --send bytes, read until EOF, close. Prints a JSON summary with bytes read.
        With --source-net NET --source-count K, connection i binds to NET's (1 + i % K)th
        address first (many distinct client addresses from one pod).
connect: try --count connects to HOST:PORT with a timeout; prints how each ended (errno).
bulk:   send --send bytes on one connection as fast as possible (for loss tests).
sink:   accept one connection and read until EOF.
"""
from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_exact(conn: socket.socket, n: int) -> int:
    """Read until n bytes arrived or the peer closed; returns how many arrived."""
    got = 0
    while got < n:
        chunk = conn.recv(min(65536, n - got))
        if not chunk:
            break
        got += len(chunk)
    return got


def _recv_all(conn: socket.socket) -> int:
    got = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return got
        got += len(chunk)


def server(a: argparse.Namespace) -> dict:
    ls = socket.socket(_family(a.host), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.host, a.port))
    ls.listen(1024)
    print("listening", flush=True)
    received = sent = 0
    payload = b"s" * a.send
    for _ in range(a.count):
        conn, _ = ls.accept()
        received += recv_exact(conn, a.recv)
        if a.send:
            conn.sendall(payload)
            sent += len(payload)
        if a.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    ls.close()
    return {"accepted": a.count, "received": received, "sent": sent}


def client(a: argparse.Namespace) -> dict:
    payload = b"c" * a.send
    lock = threading.Lock()
    totals = {"connections": 0, "sent": 0, "received": 0}

    sources = None
    if a.source_net:
        import ipaddress

        net = ipaddress.ip_network(a.source_net)
        sources = [str(net.network_address + 1 + i) for i in range(a.source_count)]

    def one(i: int) -> None:
        source = (sources[i % len(sources)], 0) if sources else None
        with socket.create_connection((a.host, a.port), timeout=10, source_address=source) as s:
            s.sendall(payload)
            got = 0
            try:
                got = _recv_all(s)
            except ConnectionResetError:
                pass
        with lock:
            totals["connections"] += 1
            totals["sent"] += len(payload)
            totals["received"] += got

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        list(pool.map(one, range(a.count)))
    return totals


def connect(a: argparse.Namespace) -> dict:
    outcomes: dict = {}
    for _ in range(a.count):
        s = socket.socket(_family(a.host), socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        try:
            s.connect((a.host, a.port))
            name = "connected"
        except OSError as exc:  # the kernel's ETIMEDOUT is a TimeoutError too: tell by errno
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "client-timeout"
        finally:
            s.close()
        outcomes[name] = outcomes.get(name, 0) + 1
    return outcomes


def bulk(a: argparse.Namespace) -> dict:
    chunk = b"b" * 65536
    left = a.send
    with socket.create_connection((a.host, a.port), timeout=60) as s:
        while left:
            n = s.send(chunk[: min(left, len(chunk))])
            left -= n
        s.shutdown(socket.SHUT_WR)
        _recv_all(s)
    return {"sent": a.send}


def sink(a: argparse.Namespace) -> dict:
    ls = socket.socket(_family(a.host), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.host, a.port))
    ls.listen(8)
    print("listening", flush=True)
    conn, _ = ls.accept()
    got = _recv_all(conn)
    conn.close()
    ls.close()
    return {"received": got}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client", "connect", "bulk", "sink"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--recv", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--source-net", default="")
    p.add_argument("--source-count", type=int, default=0)
    p.add_argument("--reset", action="store_true")
    a = p.parse_args()
    result = {"server": server, "client": client, "connect": connect, "bulk": bulk, "sink": sink}[a.mode](a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
