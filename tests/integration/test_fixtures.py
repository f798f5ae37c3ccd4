"""Proof that the integration fixtures do what the other integration tests rely on.

Each claim is checked against ground truth outside the fixture code: ping's and curl's own
reports, /proc of the started processes, the kernel's SNMP counters, nginx's access log,
DNS replies decoded from the wire, iperf3's JSON, Prometheus' query API.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import struct
import subprocess
import threading
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.integration.pods import Node, Pod, kubelet_cgroup_relpath, leftovers, netns_path
from tests.integration.servers import (
    Dnsmasq, Iperf3Server, Nginx, Prometheus, curl, dns_query, free_port, run_iperf3, run_wrk,
)

STATUSES = (200, 201, 204, 301, 404, 500, 503)


# --------------------------------------------------------------------------- helpers


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 8)]


def cgroup_id_by_handle(path: str) -> int:
    """The cgroup v2 id as libbpf/bpftool compute it: the 8-byte file handle of the directory."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    handle = _FileHandle(handle_bytes=8)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), ctypes.byref(handle), ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    return int(struct.unpack("=Q", bytes(handle.f_handle))[0])


def running(pid: int) -> bool:
    """True if pid exists and is not a zombie (orphans are reaped by pid 1 at its own pace)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ping(src: Pod, dst: str, count: int = 3) -> str:
    return src.run(["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst]).stdout


@pytest.fixture
def pods(node: Node) -> Iterator[tuple[Pod, Pod]]:
    yield node.add_pod("client"), node.add_pod("server", "prod")


@pytest.fixture
def nginx(pods: tuple[Pod, Pod]) -> Iterator[Nginx]:
    with Nginx(pods[1]) as server:
        yield server


# --------------------------------------------------------------------------- pods


def test_pods_ping_each_other_over_ipv4_and_ipv6(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    before = client.snmp()["Icmp"]["OutEchos"], client.snmp6()["Icmp6OutEchos"]
    assert "3 packets transmitted, 3 received" in ping(client, server.ipv4)
    assert "3 packets transmitted, 3 received" in ping(client, server.ipv6)
    assert "3 packets transmitted, 3 received" in ping(server, client.ipv6)
    assert client.snmp()["Icmp"]["OutEchos"] - before[0] == 3
    assert client.snmp6()["Icmp6OutEchos"] - before[1] == 3


def test_pod_addresses_and_names(node: Node, pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    assert re.fullmatch(r"mlb[0-9a-f]{6}", node.bridge)
    assert re.fullmatch(r"ml-client-[0-9a-f]{6}", client.netns)
    assert re.fullmatch(r"mlv[0-9a-f]{6}", client.host_veth)
    assert client.ipv4 == str(node.ipv4_net.network_address + 2)
    assert server.ipv6 == str(node.ipv6_net.network_address + 3)
    assert str(node.ipv6_net).startswith("fd00:6d6c:")
    addrs = client.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"{client.ipv4}/24" in addrs and f"{client.ipv6}/64" in addrs
    assert "tentative" not in addrs


@pytest.mark.parametrize("qos,driver,runtime", [
    ("besteffort", "systemd", "containerd"),
    ("guaranteed", "systemd", "cri-o"),
    ("burstable", "cgroupfs", "docker"),
    ("guaranteed", "cgroupfs", "containerd"),
])
def test_popen_runs_in_pod_cgroup_and_netns(node: Node, qos: str, driver: str, runtime: str) -> None:
    pod = node.add_pod("web", qos=qos, cgroup_driver=driver, runtime=runtime)
    proc = pod.popen(["sleep", "30"])
    assert f"0::/{pod.cgroup_relpath}\n" in open(f"/proc/{proc.pid}/cgroup").read()
    assert pod.cgroup_path == os.path.join(node.cgroup_root, pod.cgroup_relpath)
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == pod.netns_inode
    assert pod.netns_inode != os.stat("/proc/self/ns/net").st_ino
    assert pod.cgroup_id == cgroup_id_by_handle(pod.cgroup_path)
    assert pod.container_id in pod.cgroup_relpath and re.fullmatch(r"[0-9a-f]{64}", pod.container_id)


def test_kubelet_cgroup_naming() -> None:
    uid, cid = "1f2e3d4c-0000-4111-8222-333344445555", "ab" * 32
    u = uid.replace("-", "_")
    assert kubelet_cgroup_relpath(uid, cid) == (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{cid}.scope")
    assert kubelet_cgroup_relpath(uid, cid, "burstable", runtime="cri-o") == (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{cid}.scope")
    assert kubelet_cgroup_relpath(uid, cid, "guaranteed", runtime="docker") == (
        f"kubepods.slice/kubepods-pod{u}.slice/docker-{cid}.scope")
    assert kubelet_cgroup_relpath(uid, cid, "besteffort", "cgroupfs") == f"kubepods/besteffort/pod{uid}/{cid}"
    assert kubelet_cgroup_relpath(uid, cid, "guaranteed", "cgroupfs") == f"kubepods/pod{uid}/{cid}"


def test_snmp_counters_move_with_a_known_tcp_exchange(pods: tuple[Pod, Pod], nginx: Nginx) -> None:
    client, server = pods
    c0, s0 = client.snmp()["Tcp"], server.snmp()["Tcp"]
    assert curl(client, f"{nginx.url}/bytes/100003")["size_download"] == 100003
    c1, s1 = client.snmp()["Tcp"], server.snmp()["Tcp"]
    assert c1["ActiveOpens"] - c0["ActiveOpens"] == 1
    assert s1["PassiveOpens"] - s0["PassiveOpens"] == 1
    assert s1["OutSegs"] - s0["OutSegs"] >= 100003 // 1448  # at most one MSS of payload per segment
    assert c1["InSegs"] - c0["InSegs"] >= 3  # SYN-ACK, data, FIN at least
    assert "TCPTimeouts" in client.netstat()["TcpExt"]


def test_popen_processes_die_with_the_pod(node: Node) -> None:
    pod = node.add_pod("escaper")
    out = pod.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null & echo $!"]).stdout
    escaped = int(out)
    direct = pod.popen(["sleep", "300"])
    pod.close()
    pod.close()
    assert direct.poll() is not None
    assert not running(escaped)
    assert not os.path.exists(netns_path(pod.netns))
    assert not os.path.exists(pod.cgroup_path)


def test_close_leaves_nothing_behind() -> None:
    node = Node()
    pod = node.add_pod("a", qos="guaranteed")
    node.add_pod("b", cgroup_driver="cgroupfs")
    pod.popen(["sleep", "300"])
    pod.drop_packets(0.5, "ingress")
    names = [node.bridge, pod.host_veth]
    assert leftovers()
    node.close()
    node.close()
    assert leftovers() == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not any(name in links for name in names)
    assert not [x for x in leftovers(everything=True) if any(n in x for n in names + [pod.netns])]


def test_kubepods_parent_shared_with_another_run_is_not_a_leftover() -> None:
    node = Node()
    pod = node.add_pod("a")
    qos_slice = os.path.dirname(os.path.dirname(pod.cgroup_path))
    foreign = os.path.join(qos_slice, "kubepods-besteffort-podforeign.slice")  # another run's pod
    os.mkdir(foreign)
    try:
        node.close()
        assert leftovers() == []
        assert os.path.isdir(foreign) and not os.path.exists(pod.cgroup_path)
    finally:
        os.rmdir(foreign)
    assert leftovers() == []  # the parents, empty now, are removed rather than reported


# --------------------------------------------------------------------------- nginx


def test_nginx_statuses_match_access_log(pods: tuple[Pod, Pod], nginx: Nginx) -> None:
    client, _ = pods
    for status in STATUSES:
        assert curl(client, f"{nginx.url}/status/{status}")["http_code"] == status
    entries = nginx.access_log_entries(expect=len(STATUSES))
    assert [(e["request_method"], e["request_uri"], e["status"]) for e in entries] == [
        ("GET", f"/status/{status}", status) for status in STATUSES]
    assert {e["remote_addr"] for e in entries} == {client.ipv4}


def test_nginx_bytes_delay_echo_upload_head(pods: tuple[Pod, Pod], nginx: Nginx) -> None:
    client, _ = pods
    got = curl(client, f"{nginx.url6}/bytes/4099")
    assert (got["http_code"], got["size_download"]) == (200, 4099)
    delayed = curl(client, f"{nginx.url}/delay")
    assert delayed["http_code"] == 200 and delayed["time_total"] >= 0.050
    echo = curl(client, f"{nginx.url}/echo", "-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 10000)
    assert (echo["http_code"], echo["size_download"]) == (200, 10000)
    upload = client.run(["curl", "-sv", "-o", "/dev/null", "-H", "Expect: 100-continue",
                         "--data-binary", "y" * 5000, f"{nginx.url}/upload"])
    assert "< HTTP/1.1 100 Continue" in upload.stderr and "< HTTP/1.1 201 Created" in upload.stderr
    head = curl(client, f"{nginx.url}/static/index.html", "-I")
    assert (head["http_code"], head["size_download"]) == (200, 0)
    entries = nginx.access_log_entries(expect=5)
    assert [(e["request_method"], e["request_uri"], e["status"]) for e in entries] == [
        ("GET", "/bytes/4099", 200), ("GET", "/delay", 200), ("POST", "/echo", 200),
        ("POST", "/upload", 201), ("HEAD", "/static/index.html", 200)]
    assert entries[0]["body_bytes_sent"] == 4099 and entries[0]["remote_addr"] == client.ipv6
    assert entries[1]["request_time"] >= 0.050
    assert entries[3]["request_length"] > 5000


def test_wrk_requests_match_access_log(pods: tuple[Pod, Pod], nginx: Nginx) -> None:
    client, _ = pods
    result = run_wrk(client, f"{nginx.url}/bytes/613", connections=2, duration_s=1)
    assert result["requests"] > 100 and sum(result["errors"].values()) == 0
    assert 0 < result["latency_us"]["p50"] <= result["latency_us"]["p99"]
    logged = len(nginx.access_log_entries(expect=result["requests"]))
    assert result["requests"] <= logged <= result["requests"] + 2  # in flight when wrk stopped


# --------------------------------------------------------------------------- dnsmasq


def test_dnsmasq_answers_a_aaaa_and_nxdomain(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    records = {"web.test.meshlens": ["10.9.8.7", "fd00:6d6c::7"], "db.test.meshlens": ["10.9.8.6", "10.9.8.5"]}
    with Dnsmasq(server, records) as dns:
        a = dns_query(client, server.ipv4, "web.test.meshlens", "A")
        aaaa = dns_query(client, server.ipv6, "web.test.meshlens", "AAAA")
        two = dns_query(client, server.ipv4, "db.test.meshlens", "A")
        missing = dns_query(client, server.ipv4, "nope.test.meshlens", "A")
        outside = dns_query(client, server.ipv4, "example.org", "AAAA")
        log_lines = dns.query_log()
    assert (a["rcode"], a["answers"], a["aa"]) == ("NOERROR", ["10.9.8.7"], True)
    assert (aaaa["rcode"], aaaa["answers"]) == ("NOERROR", ["fd00:6d6c::7"])
    assert (two["rcode"], sorted(two["answers"])) == ("NOERROR", ["10.9.8.5", "10.9.8.6"])
    assert (missing["rcode"], missing["answers"]) == ("NXDOMAIN", [])
    assert outside["rcode"] == "NXDOMAIN"
    assert len(log_lines) == 5 and "query[AAAA] web.test.meshlens" in log_lines[1]


# --------------------------------------------------------------------------- iperf3 and loss


def test_drops_cause_retransmits_equal_to_kernel_counter(pods: tuple[Pod, Pod]) -> None:
    """iperf3's Retr equals the sender netns' RetransSegs delta when nothing else retransmits.

    Drops hit only the data stream's segments (pinned client port; no SYN/FIN/RST, whose
    retransmits iperf3 does not see) and stop before the test ends, so no retransmit
    happens after iperf3's last TCP_INFO sample (an orphaned socket's tail would).
    """
    client, server = pods
    data_port = 5301
    data_only = ["--sport", str(data_port), "--tcp-flags", "SYN,FIN,RST", "NONE"]
    with Iperf3Server(server, 5201):
        server.drop_packets(0.05, "ingress", match=data_only)
        assert server.run(["iptables", "-S", "INPUT"]).stdout.count("statistic") == 1
        stop_dropping = threading.Timer(0.6, server.clear_drops)
        before = client.snmp()["Tcp"]["RetransSegs"]
        stop_dropping.start()
        try:
            result = run_iperf3(client, server.ipv4, 5201, seconds=1, cport=data_port)
        finally:
            stop_dropping.join()
        after = client.snmp()["Tcp"]["RetransSegs"]
    assert result["sent_bytes"] > 0 and result["received_bytes"] > 0
    assert result["retransmits"] > 0
    assert after - before == result["retransmits"]
    assert "statistic" not in server.run(["iptables", "-S"]).stdout


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_a_target() -> None:
    registry = CollectorRegistry()
    Gauge("meshlens_fixture_probe", "fixture probe", registry=registry).set(42.5)
    port = free_port()
    httpd, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with Prometheus([f"127.0.0.1:{port}"]) as prom:
            result = prom.wait_for("meshlens_fixture_probe", lambda r: len(r) == 1, timeout=30)
            assert float(result[0]["value"][1]) == 42.5
            assert result[0]["metric"]["instance"] == f"127.0.0.1:{port}"
            tmpdir = prom.tmpdir
        assert not os.path.exists(tmpdir)
        assert prom.processes[0].poll() is not None
    finally:
        httpd.shutdown()
        httpd.server_close()
