"""`--l7-source auto`: pod traffic from packets at the pod veths (tc), everything no pod veth
carries from cgroup_skb on the cgroup v2 root (loopback inside a pod, processes in the host
netns, host process <-> pod), no syscalls:* tracepoint at all, and every request counted
exactly once per side, against nginx's access log (and dnsmasq's query log for DNS)."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from typing import Dict, Iterator, Tuple

import pytest

from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpStats
from meshlens.agent.sources.l7.select import BothHttpSource
from tests.integration.l7_helpers import counts_by_request, diff_counts, dns_series, log_counts, run_py, series_for, \
    settle, started_source
from tests.integration.pods import Node, cgroup2_mount
from tests.integration.servers import Dnsmasq, Nginx, _dns_client_script, free_port

LOOP = "import http.client, sys\nc = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))\n" \
       "for p in sys.argv[3:]:\n    c.request('GET', p); c.getresponse().read()\n"
RECORDS = {"web.meshlens.test": ["10.1.2.3"]}
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


def my_cgroup_id() -> int:
    """cgroup v2 id (directory inode) of this process, which host processes it starts inherit."""
    with open("/proc/self/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    return os.stat(os.path.join(cgroup2_mount(), rel.lstrip("/"))).st_ino


def host_series(l7: BothHttpSource, role: str, port: int, server_address: str = "") -> Dict[HttpSeriesKey, HttpStats]:
    """Series of processes in the host netns (this test's own cgroup) for one server port."""
    cg = my_cgroup_id()
    return {k: st for k, st in l7.snapshot().series.items()
            if k.netns == HOST_NETNS and k.cgroup_id == cg and k.role == role and k.server_port == port
            and (not server_address or k.server_address == server_address)}


def host_run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def l7() -> Iterator[BothHttpSource]:
    yield from started_source("auto")


@pytest.fixture(scope="module")
def env(l7):
    with Node() as node:
        web = node.add_pod("web")
        client = node.add_pod("client")
        with Nginx(web) as nginx, Nginx(None, free_port(), upstream_port=free_port()) as host_nginx:  # type: ignore[arg-type]
            yield node, web, client, nginx, host_nginx


def test_auto_attaches_no_syscall_tracepoint(l7) -> None:
    report = {c.signal: c for c in l7.attach_report()}
    assert report["l7_pod_traffic"].chosen.startswith("packets")
    assert report["l7_other_traffic"].chosen.startswith("cgroup_skb")
    assert any(t.startswith("fentry tcp_sendmsg/tcp_recvmsg: ") for t in report["l7_other_traffic"].tried)
    # the kernel's own view: no tracepoint attached by this process, both programs on the root
    perf = json.loads(host_run("bpftool", "-j", "perf", "list") or "[]")
    mine = [p for p in perf if p.get("pid") == os.getpid()]
    assert not [p for p in mine if str(p.get("tracepoint", "")).startswith("sys_")], mine
    names = {p["name"] for p in json.loads(host_run("bpftool", "-j", "cgroup", "show", cgroup2_mount()))}
    assert {"meshlens_cg_eg", "meshlens_cg_in"} <= names


def fdinfo(fd: int) -> Dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_both_entry_points_share_one_connection_table(l7) -> None:
    """tc and cgroup_skb use one `pkt_conns` (their keys never meet): the kernel holds one
    map of that name for this agent, not two of ~28 MB each."""
    tc_map, cg_map = l7.packets.obj.map("pkt_conns"), l7.cgroup.obj.map("pkt_conns")
    tc_info, cg_info = fdinfo(tc_map.fd), fdinfo(cg_map.fd)
    assert tc_info["map_id"] == cg_info["map_id"]
    ids = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            info = fdinfo(int(fd))
        except OSError:
            continue
        if "map_id" in info:
            shown = json.loads(host_run("bpftool", "-j", "map", "show", "id", info["map_id"]))
            if shown.get("name") == "pkt_conns":
                ids.add(info["map_id"])
    assert ids == {tc_info["map_id"]}, ids


def test_pod_traffic_once_and_loopback_from_cgroup_skb(l7, env) -> None:
    node, web, client, nginx, _ = env
    settle(l7, 0.3)   # both pods registered with the cgroup_skb path
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    pod_paths = ["/status/200", "/status/404", "/bytes/613"] * 5 + ["/status/503"]
    run_py(client, LOOP, web.ipv4, "80", *pod_paths)
    loop_paths = ["/status/201"] * 7 + ["/bytes/4099"] * 2
    run_py(web, LOOP, "127.0.0.1", "80", *loop_paths)          # inside the pod: never on its veth
    entries = nginx.access_log_entries(expect=n_log + len(pod_paths) + len(loop_paths))[n_log:]
    settle(l7)
    truth = log_counts(entries)
    srv = series_for(l7, web, "server", 80)
    assert diff_counts(counts_by_request(srv), srv0) == truth
    # the client side: the client pod's requests (tc) and the loopback client inside web (cgroup_skb)
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == log_counts(
        [e for e in entries if e["remote_addr"] == client.ipv4])
    loop_cli = {k: st for k, st in series_for(l7, web, "client", 80).items() if k.server_address == "127.0.0.1"}
    assert counts_by_request(loop_cli) == log_counts([e for e in entries if e["remote_addr"] == "127.0.0.1"])
    # who counted what: pod-to-pod from tc (cgroup 0, no process: a packet at a veth names
    # none), loopback from cgroup_skb (the pod's cgroup, and nginx: its listener was made
    # after the agent started, so cgroup/sock_create named it and accepted sockets inherit it)
    who: Dict[Tuple[int, str], int] = collections.Counter()
    for k, st in srv.items():
        who[(k.cgroup_id, k.process)] += st.count
    assert who[(web.cgroup_id, "nginx")] >= len(loop_paths)
    assert who[(0, "")] >= len(pod_paths)
    assert set(who) == {(web.cgroup_id, "nginx"), (0, "")}
    assert {k.process for k in loop_cli} == {os.path.basename(sys.executable)[:15]}


def test_host_process_loopback_once_per_side(l7, env) -> None:
    """A hostNetwork-like process talking to another over 127.0.0.1 in the host netns."""
    _, _, _, _, host_nginx = env
    port = host_nginx.port
    srv0 = counts_by_request(host_series(l7, "server", port))
    cli0 = counts_by_request(host_series(l7, "client", port))
    n_log = len(host_nginx.access_log_entries())
    paths = ["/status/200"] * 11 + ["/bytes/4099"] * 3 + ["/status/404"] * 2
    host_run(sys.executable, "-c", LOOP, "127.0.0.1", str(port), *paths)
    entries = host_nginx.access_log_entries(expect=n_log + len(paths))[n_log:]
    settle(l7)
    truth = log_counts(entries, port)
    assert diff_counts(counts_by_request(host_series(l7, "server", port)), srv0) == truth
    assert diff_counts(counts_by_request(host_series(l7, "client", port, "127.0.0.1")), cli0) == truth


def test_host_process_to_pod_once_per_side(l7, env) -> None:
    node, web, _, nginx, _ = env
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(host_series(l7, "client", 80, web.ipv4))
    n_log = len(nginx.access_log_entries())
    paths = ["/status/201"] * 5 + ["/bytes/613"] * 4 + ["/status/500"] * 3
    host_run(sys.executable, "-c", LOOP, web.ipv4, "80", *paths)
    entries = nginx.access_log_entries(expect=n_log + len(paths))[n_log:]
    settle(l7)
    truth = log_counts(entries)
    assert {e["remote_addr"] for e in entries} == {node.gateway_v4}
    assert diff_counts(counts_by_request(series_for(l7, web, "server", 80)), srv0) == truth     # tc, at web's veth
    assert diff_counts(counts_by_request(host_series(l7, "client", 80, web.ipv4)), cli0) == truth  # cgroup_skb


def test_pod_to_host_process_once_per_side(l7, env) -> None:
    node, _, client, _, host_nginx = env
    port = host_nginx.port
    srv0 = counts_by_request(host_series(l7, "server", port))
    cli0 = counts_by_request(series_for(l7, client, "client", port))
    n_log = len(host_nginx.access_log_entries())
    paths = ["/status/204"] * 6 + ["/bytes/4099"] * 5 + ["/status/301"]
    run_py(client, LOOP, node.gateway_v4, str(port), *paths)
    entries = host_nginx.access_log_entries(expect=n_log + len(paths))[n_log:]
    settle(l7)
    truth = log_counts(entries, port)
    assert {e["remote_addr"] for e in entries} == {client.ipv4}
    assert diff_counts(counts_by_request(host_series(l7, "server", port)), srv0) == truth          # cgroup_skb
    assert diff_counts(counts_by_request(series_for(l7, client, "client", port)), cli0) == truth  # tc, at client's veth


def dns_counts(series) -> Dict[Tuple[str, str], int]:
    out: Dict[Tuple[str, str], int] = collections.Counter()
    for k, st in series.items():
        out[(k.question_type, k.response_code)] += st.count
    return dict(out)


def test_dns_of_host_resolver_and_pod_loopback(l7, env) -> None:
    """The host's resolver traffic (a process in the host netns) and a lookup over loopback
    inside the DNS pod are paired by cgroup_skb, with no syscall tracepoint."""
    node, _, _, _, _ = env
    dns_pod = node.add_pod("dns")
    with Dnsmasq(dns_pod, RECORDS) as dnsmasq:
        settle(l7, 0.2)
        cg = my_cgroup_id()

        def host_view():
            return {k: st for k, st in l7.dns.snapshot().series.items()
                    if k.netns == HOST_NETNS and k.cgroup_id == cg and k.server_address == dns_pod.ipv4}

        h0, p0 = dns_counts(host_view()), dns_counts(dns_series(l7.dns.snapshot(), dns_pod))
        n_log = len(dnsmasq.query_log())
        asked = [("web.meshlens.test", "A")] * 3 + [("nope.meshlens.test", "A")] * 2 + [("web.meshlens.test", "AAAA")]
        for name, qtype in asked:
            host_run(sys.executable, "-c", _dns_client_script(), dns_pod.ipv4, "53", name, qtype, "2")
        for name, qtype in asked[:4]:
            dns_pod.run([sys.executable, "-c", _dns_client_script(), "127.0.0.1", "53", name, qtype, "2"], timeout=30)
        settle(l7)
        assert len(dnsmasq.query_log()) - n_log == len(asked) + 4
        h = {k: n - h0.get(k, 0) for k, n in dns_counts(host_view()).items() if n - h0.get(k, 0)}
        assert h == {("A", "NoError"): 3, ("A", "NXDomain"): 2, ("AAAA", "NoError"): 1}
        p = {k: n - p0.get(k, 0) for k, n in dns_counts(dns_series(l7.dns.snapshot(), dns_pod)).items()
             if n - p0.get(k, 0)}
        assert p == {("A", "NoError"): 3, ("A", "NXDomain"): 1}
