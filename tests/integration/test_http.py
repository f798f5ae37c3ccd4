"""HTTP/1.x golden signals against ground truth: nginx's access log and wrk's own report.

nginx runs in pod "web", clients in pod "client"; the agent's HTTP source runs in this process,
once on each L7 path: l7.bpf.c on the syscall tracepoints, l7pkt.bpf.c on the pod veths. Every comparison is filtered to the pods' cgroup
and netns, and taken as a difference over the test, so concurrent traffic on the machine
cannot leak in.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from meshlens.agent.sources.l7.http import HttpSource
from meshlens.agent.sources.l7.packets import PacketHttpSource
from meshlens.agent.sources.l7.structs import DURATION_BOUNDS_S
from tests.integration.l7_helpers import (
    L7_SOURCES,
    counts_by_request,
    diff_counts,
    duration_buckets,
    expand,
    log_counts,
    request_time_buckets,
    run_py,
    series_for,
    settle,
    started_source,
)
from tests.integration.pods import Node
from tests.integration.servers import Nginx, run_wrk

CLIENT = r'''
import http.client, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])

def read_all(s):
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            return out
        out += b

c = http.client.HTTPConnection(host, port)
def req(path, method="GET", body=None, headers=None, **kw):
    c.request(method, path, body=body, headers=headers or {}, **kw)
    r = c.getresponse()
    r.read()
    return r.status

# keep-alive: many requests, one connection
for p in ["/status/200"] * 3 + ["/status/201", "/status/204", "/status/204", "/status/301",
          "/status/404", "/status/404", "/status/500", "/status/503", "/bytes/613",
          "/bytes/100003", "/bytes/1", "/status/200?x=1&y=2", "/static/index.html"]:
    req(p)
req("/static/index.html", "HEAD")
req("/static/index.html", "HEAD")
for _ in range(3):
    req("/delay")
# a body that looks like a request: Content-Length must carry it
req("/echo", "POST", body=b"GET /fake HTTP/1.1\r\nHost: x\r\n\r\n")
# chunked upload whose chunks look like requests
req("/echo", "POST", body=iter([b"hello ", b"GET /fake2 HTTP/1.1\r\n\r\n", b"world"]), encode_chunked=True)
c.close()

# a body split over many writes (and reads on the server)
s = socket.create_connection((host, port))
body = b"PUT /x HTTP/1.1\r\n" + b"y" * 3000
s.sendall(b"PUT /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
for i in range(0, len(body), 700):
    time.sleep(0.02)
    s.sendall(body[i:i + 700])
assert read_all(s).startswith(b"HTTP/1.1 200")
s.close()

# chunked body, chunk headers split across writes
s = socket.create_connection((host, port))
s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
for part in (b"1", b"0\r\n0123456789ABCDEF\r", b"\n5;ext=1\r\nGET /\r\n", b"0\r\n", b"\r\n"):
    time.sleep(0.02)
    s.sendall(part)
assert read_all(s).startswith(b"HTTP/1.1 200")
s.close()

# pipelining: three requests in one write
s = socket.create_connection((host, port))
s.sendall(b"GET /status/200 HTTP/1.1\r\nHost: p\r\n\r\n"
          b"GET /status/404 HTTP/1.1\r\nHost: p\r\n\r\n"
          b"GET /bytes/613 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
assert read_all(s).count(b"HTTP/1.1 ") == 3
s.close()

# 100-continue: the interim response must not end the request
s = socket.create_connection((host, port))
data = b"z" * 5000
s.sendall(b"PUT /upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nConnection: close\r\n"
          b"Content-Length: %d\r\n\r\n" % len(data))
first = s.recv(4096)
assert first.startswith(b"HTTP/1.1 100"), first
s.sendall(data)
rest = read_all(s)
assert b" 201 " in first + rest, first + rest
s.close()

# HTTP/1.0, no keep-alive
s = socket.create_connection((host, port))
s.sendall(b"GET /status/201 HTTP/1.0\r\n\r\n")
assert read_all(s).startswith(b"HTTP/1.1 201")
s.close()
print("done")
'''

EXPECTED_REQUESTS = 30  # requests CLIENT makes (each one line in nginx's access log)


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
            yield node, web, client, nginx


def test_requests_match_nginx_access_log(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    before_srv = counts_by_request(series_for(l7, web, "server", 80))
    before_cli = counts_by_request(series_for(l7, client, "client", 80))
    srv_before_buckets = duration_buckets(series_for(l7, web, "server", 80), lambda k: True)
    n_log = len(nginx.access_log_entries())

    assert run_py(client, CLIENT, web.ipv4, "80").strip() == "done"
    entries = nginx.access_log_entries(expect=n_log + EXPECTED_REQUESTS)[n_log:]
    assert len(entries) == EXPECTED_REQUESTS
    settle(l7)

    srv_series = series_for(l7, web, "server", 80)
    cli_series = series_for(l7, client, "client", 80)
    truth = log_counts(entries)
    assert diff_counts(counts_by_request(srv_series), before_srv) == truth
    assert diff_counts(counts_by_request(cli_series), before_cli) == truth
    # every histogram observation is one request
    for st in list(srv_series.values()) + list(cli_series.values()):
        assert st.duration.count == st.count == sum(st.duration.counts)
    # server latency agrees with nginx's $request_time within one bucket, request by request
    # once both are sorted (fast ones, /delay, bodies trickled in over 100 ms)
    ours = expand([a - b for a, b in zip(duration_buckets(srv_series, lambda k: True), srv_before_buckets)])
    theirs = request_time_buckets(entries)
    assert len(ours) == len(theirs) == EXPECTED_REQUESTS
    assert all(abs(a - b) <= 1 for a, b in zip(ours, theirs)), (ours, theirs)
    # HEAD and 204: no response body; /bytes/100003: exactly that many bytes
    for k, st in srv_series.items():
        if k.method == "HEAD" or k.status == 204:
            assert st.response_body.total == 0 and st.response_body.count == st.count
        if k.route == "/bytes/{id}":
            assert st.response_body.count == st.count


def test_delay_latency_buckets_and_request_time(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    delay = lambda k: k.route == "/delay"  # noqa: E731
    srv0 = duration_buckets(series_for(l7, web, "server", 80), delay)
    cli0 = duration_buckets(series_for(l7, client, "client", 80), delay)
    n_log = len(nginx.access_log_entries())
    run_py(client, "import urllib.request, sys\nfor _ in range(5): urllib.request.urlopen(sys.argv[1]).read()",
           nginx.url + "/delay")
    entries = nginx.access_log_entries(expect=n_log + 5)[n_log:]
    settle(l7)
    srv = [a - b for a, b in zip(duration_buckets(series_for(l7, web, "server", 80), delay), srv0)]
    cli = [a - b for a, b in zip(duration_buckets(series_for(l7, client, "client", 80), delay), cli0)]
    assert sum(srv) == sum(cli) == 5
    # the upstream sleeps 50 ms: every server-side observation is in the bucket that starts at 50 ms
    i50 = DURATION_BOUNDS_S.index(0.05)
    assert srv[i50 + 1] == 5, srv
    # client side: never below 50 ms
    assert sum(cli[: i50 + 1]) == 0, cli
    # nginx's $request_time lands in the same bucket or a neighbour
    ours, theirs = expand(srv), request_time_buckets(entries)
    assert len(ours) == len(theirs)
    assert all(abs(a - b) <= 1 for a, b in zip(ours, theirs)), (ours, theirs)


def test_ipv6_request(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    before = counts_by_request(series_for(l7, web, "server", 80))
    run_py(client, "import urllib.request, sys\nurllib.request.urlopen(sys.argv[1]).read()", nginx.url6 + "/status/200")
    settle(l7)
    assert diff_counts(counts_by_request(series_for(l7, web, "server", 80)), before) == {("GET", 200, "/status/{id}"): 1}
    v6 = [k for k in series_for(l7, client, "client", 80) if k.server_address == web.ipv6]
    assert v6, "client-side series to the IPv6 address"


def test_wrk_counts_match_nginx_and_wrk(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    no_response0 = l7.health().kernel_counters["no_response"]
    res = run_wrk(client, nginx.url + "/status/200", connections=7, duration_s=2)
    assert res["requests"] > 1000
    settle(l7, 0.5)
    entries = nginx.access_log_entries(expect=n_log + res["requests"])[n_log:]
    srv = diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0)
    cli = diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0)
    key = ("GET", 200, "/status/{id}")
    assert set(srv) == set(log_counts(entries)) == {key}
    # wrk stops by closing its 7 connections with requests in flight. nginx logs what it
    # answered; wrk counts what it finished reading. A request whose connection the client
    # reset before the server's response was seen is counted by the kernel as no_response,
    # not as a request: at most one per connection, and never silently.
    missed = len(entries) - srv[key]
    assert res["requests"] <= srv[key] <= len(entries)
    assert missed <= 7
    assert l7.health().kernel_counters["no_response"] - no_response0 >= missed
    assert res["requests"] <= cli[key] <= len(entries)
    print(f"wrk: {res['requests']} requests ({res['rps']:.0f}/s); nginx log {len(entries)}; "
          f"agent server {srv[key]}, client {cli[key]}")


CHUNKED_SERVER = r'''
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            # chunk data that looks like a response, one chunk per write
            for part in (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"x" * 3000, b"HTTP/1.1 500 "):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            body = b"HTTP/1.1 404 Not Found\r\n\r\n"
            self.send_response(202)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

CHUNKED_CLIENT = r'''
import http.client, sys, time
for _ in range(50):
    try:
        c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2])); c.connect(); break
    except OSError:
        time.sleep(0.1)
for p in ["/chunked/1", "/plain", "/chunked/2", "/chunked/3", "/plain"]:
    c.request("GET", p)
    r = c.getresponse()
    r.read()
print("done")
'''


def test_chunked_responses_with_response_like_bodies(l7, env) -> None:
    """Keep-alive responses with chunked bodies whose chunks (and a Content-Length body)
    start like responses: counted once each, on both sides."""
    _node, web, client, _nginx = env
    port = 18998
    srv = web.popen(["python3", "-c", CHUNKED_SERVER, str(port)])
    try:
        settle(l7, 0.1)
        cli0 = counts_by_request(series_for(l7, client, "client", port))
        srv0 = counts_by_request(series_for(l7, web, "server", port))
        assert run_py(client, CHUNKED_CLIENT, web.ipv4, str(port)).strip() == "done"
        settle(l7)
        want = {("GET", 200, "/chunked/{id}"): 3, ("GET", 202, "/plain"): 2}
        assert diff_counts(counts_by_request(series_for(l7, client, "client", port)), cli0) == want
        assert diff_counts(counts_by_request(series_for(l7, web, "server", port)), srv0) == want
    finally:
        srv.kill()
        srv.wait()


MIDSTREAM_CLIENT = r'''
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80)
c.request("GET", "/status/200"); c.getresponse().read()
print("ready", flush=True)
sys.stdin.readline()                        # the agent starts now
for p in ("/status/201", "/status/404", "/bytes/613"):
    c.request("GET", p); c.getresponse().read()
print("done", flush=True)
'''


def test_agent_started_mid_connection(l7, env) -> None:
    """Keep-alive connections that predate the agent: the requests after its start count,
    nothing before does, nothing is invented."""
    import subprocess
    import sys as _sys

    _node, web, client, nginx = env
    proc = client.popen([_sys.executable, "-c", MIDSTREAM_CLIENT, web.ipv4], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        gen = started_source("packets" if isinstance(l7, PacketHttpSource) else "syscalls")
        src = next(gen)
        try:
            n_log = len(nginx.access_log_entries())
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
            entries = nginx.access_log_entries(expect=n_log + 3)[n_log:]
            settle(src)
            want = log_counts(entries)
            assert want == {("GET", 201, "/status/{id}"): 1, ("GET", 404, "/status/{id}"): 1,
                            ("GET", 200, "/bytes/{id}"): 1}
            assert counts_by_request(series_for(src, web, "server", 80)) == want
            assert counts_by_request(series_for(src, client, "client", 80)) == want
        finally:
            for _ in gen:
                pass
    finally:
        proc.kill()
        proc.wait()


CONFORMANCE_CLIENT = r'''
import http.client, socket, sys, time
host = sys.argv[1]

def read_all(s):
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            return out
        out += b

# methods outside RFC 9110 + PATCH (WebDAV, caches, SSDP, the QUERY draft): any token
c = http.client.HTTPConnection(host, 80)
for m in ("PURGE", "REPORT", "SEARCH", "M-SEARCH", "QUERY", "LINK", "PROPFIND", "PATCH"):
    c.request(m, "/status/200")
    r = c.getresponse(); r.read()
# Upgrade asked for, answered with an ordinary response
c.request("GET", "/status/201", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
c.getresponse().read()
c.request("GET", "/status/200", headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                         "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
c.getresponse().read()
c.close()
# an empty line before the request line (RFC 9112 2.2), on a new connection
s = socket.create_connection((host, 80))
s.sendall(b"\r\nGET /status/201 HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
assert read_all(s).startswith(b"HTTP/1.1 201")
s.close()
# ... and after a POST body on a keep-alive connection (what some clients send)
s = socket.create_connection((host, 80))
s.sendall(b"POST /echo HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nhello\r\n")
time.sleep(0.2)
s.sendall(b"GET /status/404 HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
got = read_all(s)
assert got.count(b"HTTP/1.1 ") == 2, got
s.close()
print("done")
'''

STANDARD = {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"}


def test_conformance_other_methods_leading_crlf_upgrade(l7, env) -> None:
    """Requests real clients send that RFC 9112 allows: every one counted, on both sides,
    methods outside the standard set as `_OTHER` (OpenTelemetry HTTP conventions)."""
    _node, web, client, nginx = env
    settle(l7, 0.1)
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    assert run_py(client, CONFORMANCE_CLIENT, web.ipv4).strip() == "done"
    entries = nginx.access_log_entries(expect=n_log + 13)[n_log:]
    assert len(entries) == 13
    for e in entries:
        if e["request_method"] not in STANDARD:
            e["request_method"] = "_OTHER"
    settle(l7)
    truth = log_counts(entries)
    assert diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0) == truth
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == truth


UPGRADE_SERVER = r'''
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1]))); ls.listen(8)
while True:
    s, _ = ls.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    if b"Upgrade: echo" in buf:
        s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        while True:                     # the tunnel: echo whatever comes, HTTP-looking or not
            b = s.recv(4096)
            if not b:
                break
            s.sendall(b)
    else:
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        s.recv(4096)
    s.close()
'''

UPGRADE_CLIENT = r'''
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
for _ in range(50):
    try:
        s = socket.create_connection((host, port)); break
    except OSError:
        time.sleep(0.1)
s.sendall(b"GET /tunnel HTTP/1.1\r\nHost: u\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
assert s.recv(4096).startswith(b"HTTP/1.1 101")
for _ in range(3):  # inside the tunnel: not HTTP/1 any more, however it looks
    msg = b"GET /inside HTTP/1.1\r\nHost: u\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += s.recv(4096)
    time.sleep(0.05)
s.close()
print("done")
'''


def test_upgrade_101_counts_the_request_then_stops(l7, env) -> None:
    _node, web, client, _nginx = env
    port = 18997
    srv = web.popen(["python3", "-c", UPGRADE_SERVER, str(port)])
    try:
        settle(l7, 0.1)
        srv0 = counts_by_request(series_for(l7, web, "server", port))
        cli0 = counts_by_request(series_for(l7, client, "client", port))
        up0 = l7.kernel_counters()["upgrade"]
        assert run_py(client, UPGRADE_CLIENT, web.ipv4, str(port)).strip() == "done"
        settle(l7)
        want = {("GET", 101, "/tunnel"): 1}
        assert diff_counts(counts_by_request(series_for(l7, web, "server", port)), srv0) == want
        assert diff_counts(counts_by_request(series_for(l7, client, "client", port)), cli0) == want
        assert l7.kernel_counters()["upgrade"] - up0 >= 2   # both sides stopped parsing
    finally:
        srv.kill()
        srv.wait()
