"""Hostile and broken HTTP traffic: the agent must not crash, must not invent requests, and
its parse-error counters must move. Also: HTTP on a port that is not 80 is still HTTP.

Parse-error counters are node-wide (the kernel does not know pods), so they are checked as
lower bounds; request counts are filtered to the test pods and must be exact."""
from __future__ import annotations

from typing import Iterator

import pytest

from meshlens.agent.sources.l7.http import HttpSource
from meshlens.agent.sources.l7.packets import PacketHttpSource
from tests.integration.l7_helpers import (
    L7_SOURCES,
    counts_by_request,
    diff_counts,
    log_counts,
    run_py,
    series_for,
    settle,
    started_source,
)
from tests.integration.pods import Node
from tests.integration.servers import Nginx

BAD_CLIENT = r'''
import os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])

def conn():
    return socket.create_connection((host, port), timeout=5)

def drain(s):
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except (socket.timeout, ConnectionResetError):
        pass
    return out

# 1. random bytes (first byte not a letter)
s = conn(); s.sendall(b"\x00" + os.urandom(300)); s.shutdown(socket.SHUT_WR); drain(s); s.close()
# 2. not HTTP on port 80: a TLS ClientHello-like record, and a text protocol
s = conn(); s.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 100); s.shutdown(socket.SHUT_WR); drain(s); s.close()
s = conn(); s.sendall(b"HELLO server\r\n\r\n"); s.shutdown(socket.SHUT_WR); drain(s); s.close()
# 3. truncated request: the client gives up inside the headers
s = conn(); s.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\nUser-Ag"); time.sleep(0.1); s.close()
# 4. a 64 KiB header
s = conn()
try:
    s.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
except (BrokenPipeError, ConnectionResetError):
    pass
drain(s); s.close()
# 5. a valid request, then garbage on the same keep-alive connection
s = conn(); s.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
time.sleep(0.1)
s.sendall(b"\x01\x02garbage\r\n\r\n"); s.shutdown(socket.SHUT_WR); drain(s); s.close()
# 6. connection closed mid-response
s = conn(); s.sendall(b"GET /bytes/100003 HTTP/1.1\r\nHost: x\r\n\r\n")
got = s.recv(1000)
assert got.startswith(b"HTTP/1.1 200"), got
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
s.close()
print("done")
'''


@pytest.fixture(scope="module", params=L7_SOURCES)
def l7(request) -> Iterator[HttpSource]:
    """Every test runs on both L7 paths: syscall tracepoints and packets at the pod veths."""
    yield from started_source(request.param)


@pytest.fixture(scope="module")
def env(l7):
    with Node() as node:
        web = node.add_pod("web")
        client = node.add_pod("client")
        with Nginx(web) as nginx:
            yield web, client, nginx


def test_bad_input_no_phantoms_and_counters_move(l7, env) -> None:
    web, client, nginx = env
    settle(l7, 0.1)
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    k0 = l7.kernel_counters()
    n_log = len(nginx.access_log_entries())
    assert run_py(client, BAD_CLIENT, web.ipv4, "80").strip() == "done"
    settle(l7, 0.5)
    entries = nginx.access_log_entries()[n_log:]
    srv = diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0)
    k1 = l7.kernel_counters()
    moved = {n: k1[n] - k0.get(n, 0) for n in k1 if k1[n] - k0.get(n, 0)}

    # The two well-formed requests, and the 64 KiB-header request that nginx answered 400
    # before our header budget ran out; nginx logs each of them (and 400s with request "-" for
    # the garbage connections, which are not HTTP requests to us).
    logged = log_counts(entries)
    assert srv == {("GET", 200, "/status/{id}"): 1, ("GET", 200, "/bytes/{id}"): 1,
                   ("GET", 400, "/status/{id}"): 1}, (srv, logged, moved)
    # nginx also logs a 400 for the truncated request although it never sent a response (the
    # client had gone): that one is counted by us as no_response, not as a request.
    assert all(logged.get(k, 0) >= n for k, n in srv.items()), (srv, logged)
    # every kind of give-up was counted
    assert moved.get("not_http", 0) >= 3, moved
    assert moved.get("header_too_large", 0) + moved.get("scan_budget", 0) >= 1, moved
    assert moved.get("truncated", 0) >= 1 and moved.get("no_response", 0) >= 1, moved
    assert moved.get("bad_start", 0) >= 1, moved
    assert l7.health().callback_errors == 0


def test_http_on_a_non_standard_port(l7, env) -> None:
    web, client, _nginx = env
    srv = web.popen(["python3", "-m", "http.server", "18999", "--bind", "0.0.0.0"])
    try:
        run_py(client, "import time, urllib.request, sys\n"
                       "for _ in range(50):\n"
                       "    try:\n"
                       "        urllib.request.urlopen(sys.argv[1]).read(); break\n"
                       "    except OSError: time.sleep(0.1)\n",
               f"http://{web.ipv4}:18999/")
        settle(l7, 0.1)
        before = counts_by_request(series_for(l7, web, "server", 18999))
        run_py(client, "import urllib.request, sys\nfor _ in range(3): urllib.request.urlopen(sys.argv[1]).read()",
               f"http://{web.ipv4}:18999/")
        settle(l7)
        got = diff_counts(counts_by_request(series_for(l7, web, "server", 18999)), before)
        assert got == {("GET", 200, "/"): 3}
    finally:
        srv.kill()
        srv.wait()


def test_full_stats_map_overflows_exactly_and_tap_samples(l7, env) -> None:
    """A tiny kernel stats map: requests that find no room travel as overflow records, idle
    entries are retired to user space, and counts stay exact. The tap samples 1 in 2."""
    web, client, nginx = env
    gen = started_source("packets" if isinstance(l7, PacketHttpSource) else "syscalls",
                         stats_max_entries=4, sample_every=2)
    src = next(gen)
    try:
        settle(src, 0.1)
        before = counts_by_request(series_for(src, web, "server", 80))
        samples0 = src.kernel_counters()["samples"]
        n_log = len(nginx.access_log_entries())
        paths = [f"/status/{c}" for c in (200, 201, 204, 404, 500, 503)] + ["/static/index.html", "/bytes/613"]
        run_py(client, "import http.client, sys\n"
                       "c = http.client.HTTPConnection(sys.argv[1], 80)\n"
                       "for p in sys.argv[2:]:\n"
                       "    c.request('GET', p); c.getresponse().read()\n",
               web.ipv4, *(paths * 3))
        entries = nginx.access_log_entries(expect=n_log + 3 * len(paths))[n_log:]
        settle(src, 0.5)
        got = diff_counts(counts_by_request(series_for(src, web, "server", 80)), before)
        assert got == log_counts(entries)
        assert src.snapshot().overflow_records > 0
        assert src.kernel_counters()["stats_full"] > 0
        # 48 request records (server and client side), one in two sampled per CPU; the
        # bounded tap may already be full of other traffic, so count in the kernel
        assert src.kernel_counters()["samples"] - samples0 >= 20
        assert all(t.duration_s >= 0 for t in src.snapshot().tap)
    finally:
        for _ in gen:
            pass
