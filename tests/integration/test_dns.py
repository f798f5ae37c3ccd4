"""DNS lookups against ground truth: dnsmasq with known records in pod "dns", clients in pod
"client" (a plain UDP client, glibc's resolver, which sends A+AAAA with sendmmsg, and
`dig +tcp` for DNS over TCP). Counts per (question type, response code) must be exact;
filtered to the client pod."""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
from typing import Dict, Iterator, Tuple

import pytest

from meshlens.agent.sources.l7.http import HttpSource
from meshlens.agent.sources.l7.packets import PacketHttpSource
from tests.integration.l7_helpers import L7_SOURCES, dns_series, settle, started_source
from tests.integration.pods import Node
from tests.integration.servers import Dnsmasq, dns_query

RECORDS = {"web.meshlens.test": ["10.1.2.3"], "db.meshlens.test": ["10.1.2.4", "fd00::4"]}


@pytest.fixture(scope="module", params=L7_SOURCES)
def l7(request) -> Iterator[HttpSource]:
    """Every test runs on both L7 paths: syscall tracepoints and packets at the pod veths."""
    yield from started_source(request.param)


@pytest.fixture(scope="module")
def env(l7):
    with Node() as node:
        dns_pod = node.add_pod("dns")
        client = node.add_pod("client")
        with Dnsmasq(dns_pod, RECORDS) as dnsmasq:
            yield dns_pod, client, dnsmasq


def counts(l7: HttpSource, pod) -> Dict[Tuple[str, str], int]:
    out: Dict[Tuple[str, str], int] = collections.Counter()
    for k, st in dns_series(l7.dns.snapshot(), pod).items():
        out[(k.question_type, k.response_code)] += st.count
    return dict(out)


def delta(a, b):
    return {k: n - b.get(k, 0) for k, n in a.items() if n - b.get(k, 0)}


def test_udp_client_counts_and_rcodes(l7, env) -> None:
    dns_pod, client, dnsmasq = env
    settle(l7, 0.1)
    before = counts(l7, client)
    n_log = len(dnsmasq.query_log())
    asked = [("web.meshlens.test", "A"), ("web.meshlens.test", "A"), ("db.meshlens.test", "A"),
             ("db.meshlens.test", "AAAA"), ("web.meshlens.test", "AAAA"), ("nope.meshlens.test", "A"),
             ("nope.meshlens.test", "AAAA")]
    replies = [dns_query(client, dns_pod.ipv4, name, qtype) for name, qtype in asked]
    settle(l7)
    assert [r["rcode"] for r in replies] == ["NOERROR"] * 5 + ["NXDOMAIN"] * 2
    assert delta(counts(l7, client), before) == {("A", "NoError"): 3, ("AAAA", "NoError"): 2,
                                                  ("A", "NXDomain"): 1, ("AAAA", "NXDomain"): 1}
    assert len(dnsmasq.query_log()) - n_log == len(asked)
    # answers: db has one A and one AAAA, web one A, web AAAA is NODATA
    series = dns_series(l7.dns.snapshot(), client)
    answers = {(k.question_name, k.question_type): st.answers for k, st in series.items()}
    assert answers[("db.meshlens.test.", "AAAA")] >= 1
    assert answers[("web.meshlens.test.", "AAAA")] == 0
    assert all(k.server_port == 53 and k.server_address == dns_pod.ipv4 for k in series)
    assert all(st.duration.count == st.count for st in series.values())


def test_glibc_resolver_sendmmsg(l7, env) -> None:
    """getent ahosts -> getaddrinfo(AF_UNSPEC): glibc sends A and AAAA in one sendmmsg."""
    dns_pod, client, _dnsmasq = env
    settle(l7, 0.1)
    before = counts(l7, client)
    tmp = tempfile.mkdtemp(prefix="meshlens-resolv-")
    try:
        conf = os.path.join(tmp, "resolv.conf")
        with open(conf, "w") as f:
            f.write(f"nameserver {dns_pod.ipv4}\noptions timeout:2 attempts:1\n")
        script = f"mount --bind {conf} /etc/resolv.conf && getent ahosts db.meshlens.test; getent ahosts nope.meshlens.test; true"
        out = client.run(["unshare", "-m", "sh", "-c", script], timeout=30).stdout
    finally:
        os.unlink(conf)
        os.rmdir(tmp)
    assert "10.1.2.4" in out
    settle(l7)
    got = delta(counts(l7, client), before)
    assert got == {("A", "NoError"): 1, ("AAAA", "NoError"): 1, ("A", "NXDomain"): 1, ("AAAA", "NXDomain"): 1}, got


def test_ipv6_server(l7, env) -> None:
    dns_pod, client, _dnsmasq = env
    settle(l7, 0.1)
    before = counts(l7, client)
    assert dns_query(client, dns_pod.ipv6, "db.meshlens.test", "AAAA")["answers"] == ["fd00::4"]
    settle(l7)
    assert delta(counts(l7, client), before) == {("AAAA", "NoError"): 1}
    assert any(k.server_address == dns_pod.ipv6 for k in dns_series(l7.dns.snapshot(), client))


def test_dns_over_tcp_from_packets(l7, env) -> None:
    """dig +tcp (BIND's client): each lookup on its own TCP connection, the message after its
    2-byte length at the start of a segment; paired in the kernel, exact per (type, rcode)."""
    if not isinstance(l7, PacketHttpSource):
        pytest.skip("DNS over TCP is parsed on the packet path only (docs/l7.md)")
    if shutil.which("dig") is None:
        pytest.fail("dig not installed (Debian package bind9-dnsutils; `make deps` installs it)")
    dns_pod, client, dnsmasq = env
    settle(l7, 0.1)
    before = counts(l7, client)
    n_log = len(dnsmasq.query_log())
    k0 = l7.kernel_counters()
    asked = [("web.meshlens.test", "A")] * 3 + [("db.meshlens.test", "AAAA")] * 2 + \
            [("nope.meshlens.test", "A")] * 2 + [("db.meshlens.test", "A")]
    statuses = collections.Counter()
    for name, qtype in asked:
        out = client.run(["dig", "+tcp", "+tries=1", "+time=3", "-p", "53", f"@{dns_pod.ipv4}", name, qtype],
                         timeout=20).stdout
        statuses[out.split("status: ", 1)[1].split(",", 1)[0]] += 1
    settle(l7)
    assert statuses == {"NOERROR": 6, "NXDOMAIN": 2}, statuses
    assert len(dnsmasq.query_log()) - n_log == len(asked)
    assert delta(counts(l7, client), before) == {("A", "NoError"): 4, ("AAAA", "NoError"): 2,
                                                  ("A", "NXDomain"): 2}
    k1 = l7.kernel_counters()
    assert k1["dns_queries"] - k0["dns_queries"] == len(asked)
    assert k1["dns_unmatched"] == k0["dns_unmatched"] and k1["dns_malformed"] == k0["dns_malformed"]
    series = dns_series(l7.dns.snapshot(), client)
    assert all(st.duration.count == st.count for st in series.values())
