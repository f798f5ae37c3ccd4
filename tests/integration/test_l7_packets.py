"""HTTP from packets at the pod veths (bpf/l7pkt.bpf.c) against nginx's access log, in the
cases only the packet path meets: 2 % random loss on both pods' links (retransmits, partial
overlaps), bodies nginx sends with sendfile (no write syscall shows them), 50 requests
pipelined in one send, a request written one byte per segment, and a node-local connection
counted once at each of its two pods. Counts are filtered to the test pods and taken as
differences, so other traffic on the machine cannot leak in.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from meshlens.agent.sources.l7.http import HttpSource
from tests.integration.l7_helpers import (
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

BYTE_SIZES = (1, 613, 4099, 100003, 1048573)


@pytest.fixture(scope="module")
def l7() -> Iterator[HttpSource]:
    yield from started_source("packets")


@pytest.fixture(scope="module")
def env(l7):
    with Node() as node:
        web = node.add_pod("web")
        client = node.add_pod("client")
        with Nginx(web, byte_sizes=BYTE_SIZES) as nginx:
            yield node, web, client, nginx


def body_bytes(l7: HttpSource, pod, role: str, route: str):
    """(requests, response body bytes, responses with a known size) for one route."""
    n = total = known = 0
    for k, st in series_for(l7, pod, role, 80).items():
        if k.route == route:
            n += st.count
            total += int(st.response_body.total)
            known += st.response_body.count
    return n, total, known


LOSSY_CLIENT = r'''
import http.client, sys
host = sys.argv[1]
conns = [http.client.HTTPConnection(host, 80, timeout=60) for _ in range(3)]
paths = ["/bytes/100003", "/bytes/4099", "/status/404", "/bytes/613", "/status/200", "/bytes/1048573"]
n = 0
for i in range(211):
    c = conns[i % 3]
    if i % 7 == 3:
        c.request("POST", "/echo", body=b"q" * 4099)
    else:
        c.request("GET", paths[i % len(paths)])
    r = c.getresponse()
    r.read()
    n += 1
print(n)
'''


def test_two_percent_loss_counts_stay_exact(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    k0 = l7.kernel_counters()
    n_log = len(nginx.access_log_entries())
    retrans0 = web.snmp()["Tcp"]["RetransSegs"] + client.snmp()["Tcp"]["RetransSegs"]
    # dropped after the veth, on the receiving side: both hooks see the original and the
    # retransmit (the sender's own OUTPUT would report EPERM instead of losing the segment)
    web.drop_packets(0.02, "ingress")
    client.drop_packets(0.02, "ingress")
    try:
        assert run_py(client, LOSSY_CLIENT, web.ipv4, timeout=240).strip() == "211"
    finally:
        web.clear_drops()
        client.clear_drops()
    entries = nginx.access_log_entries(expect=n_log + 211)[n_log:]
    settle(l7, 0.5)
    retrans = web.snmp()["Tcp"]["RetransSegs"] + client.snmp()["Tcp"]["RetransSegs"] - retrans0
    k1 = l7.kernel_counters()
    moved = {n: k1[n] - k0.get(n, 0) for n in k1 if k1[n] - k0.get(n, 0)}
    print(f"loss: kernel RetransSegs {retrans}; agent {moved}")
    assert retrans > 0, "the loss did cause retransmits"
    assert moved.get("pkt_retransmits", 0) + moved.get("pkt_overlaps", 0) > 0
    truth = log_counts(entries)
    assert sum(truth.values()) == 211
    assert diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0) == truth
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == truth


def test_sendfile_bodies_exact(l7, env) -> None:
    """nginx sends /bytes/* with sendfile: the body never passes a write syscall, the packets
    carry it, and its size is exact (nginx's own body_bytes_sent agrees)."""
    _node, web, client, nginx = env
    assert nginx.sendfile
    settle(l7, 0.1)
    route = "/bytes/{id}"
    before = {r: body_bytes(l7, p, r_, route) for r, p, r_ in (("srv", web, "server"), ("cli", client, "client"))}
    n_log = len(nginx.access_log_entries())
    sizes = [1048573, 4099, 100003, 1048573, 613, 1]
    run_py(client, "import http.client, sys\nc = http.client.HTTPConnection(sys.argv[1], 80)\n"
                   "for p in sys.argv[2:]:\n    c.request('GET', p); r = c.getresponse(); assert len(r.read()) == int(p.split('/')[-1])\n",
           web.ipv4, *(f"/bytes/{n}" for n in sizes))
    entries = nginx.access_log_entries(expect=n_log + len(sizes))[n_log:]
    settle(l7)
    assert sum(e["body_bytes_sent"] for e in entries) == sum(sizes)
    for side, pod, role in (("srv", web, "server"), ("cli", client, "client")):
        n, total, known = body_bytes(l7, pod, role, route)
        n0, total0, known0 = before[side]
        assert (n - n0, total - total0, known - known0) == (len(sizes), sum(sizes), len(sizes)), side


PIPELINE_CLIENT = r'''
import socket, sys
paths = ["/status/200", "/status/404", "/bytes/613", "/status/201", "/bytes/4099"]
reqs = b"".join(b"GET %s HTTP/1.1\r\nHost: p\r\n\r\n" % paths[i % 5].encode() for i in range(49))
reqs += b"GET /status/204 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
s = socket.create_connection((sys.argv[1], 80))
s.sendall(reqs)                       # 50 requests, one send
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
print(out.count(b"HTTP/1.1 "))
'''


def test_fifty_pipelined_requests_in_one_send(l7, env) -> None:
    _node, web, client, nginx = env
    settle(l7, 0.1)
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    assert run_py(client, PIPELINE_CLIENT, web.ipv4).strip() == "50"
    entries = nginx.access_log_entries(expect=n_log + 50)[n_log:]
    settle(l7)
    truth = log_counts(entries)
    assert sum(truth.values()) == 50
    assert diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0) == truth
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == truth


BYTEWISE_CLIENT = r'''
import socket, sys, time
req = b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
s = socket.create_connection((sys.argv[1], 80))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for b in req:
    s.send(bytes([b]))               # one byte per segment
    time.sleep(0.002)
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
assert out.startswith(b"HTTP/1.1 201"), out
print("done")
'''


def test_request_one_byte_per_segment(l7, env) -> None:
    _node, web, client, nginx = env
    # no request of this module sends /upload whole: its route's text comes from this one,
    # carried over its one-byte segments (path_carry), not from an earlier request
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    assert run_py(client, BYTEWISE_CLIENT, web.ipv4).strip() == "done"
    entries = nginx.access_log_entries(expect=n_log + 1)[n_log:]
    settle(l7)
    assert log_counts(entries) == {("POST", 201, "/upload"): 1}
    srv = series_for(l7, web, "server", 80)
    assert diff_counts(counts_by_request(srv), srv0) == {("POST", 201, "/upload"): 1}
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == {("POST", 201, "/upload"): 1}


def test_node_local_connection_counted_once_per_side(l7, env) -> None:
    """Client and server pods on one node: the connection crosses both veths; the server
    pod's veth gives the server-side series, the client pod's the client side, and no pod
    gets the other's role."""
    _node, web, client, nginx = env
    settle(l7, 0.1)
    before = {(p.name, r): counts_by_request(series_for(l7, p, r, 80))
              for p in (web, client) for r in ("server", "client")}
    n_log = len(nginx.access_log_entries())
    run_py(client, "import http.client, sys\nc = http.client.HTTPConnection(sys.argv[1], 80)\n"
                   "for _ in range(13):\n    c.request('GET', '/status/201'); c.getresponse().read()\n", web.ipv4)
    entries = nginx.access_log_entries(expect=n_log + 13)[n_log:]
    settle(l7)
    after = {(p.name, r): counts_by_request(series_for(l7, p, r, 80))
             for p in (web, client) for r in ("server", "client")}
    truth = log_counts(entries)
    assert truth == {("GET", 201, "/status/{id}"): 13}
    assert diff_counts(after[(web.name, "server")], before[(web.name, "server")]) == truth
    assert diff_counts(after[(client.name, "client")], before[(client.name, "client")]) == truth
    assert diff_counts(after[(web.name, "client")], before[(web.name, "client")]) == {}
    assert diff_counts(after[(client.name, "server")], before[(client.name, "server")]) == {}
