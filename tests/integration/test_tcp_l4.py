"""L4 telemetry against ground truth: the real agent (`meshlens run`) watches pods on a
simulated node; counts and bytes must equal what the workload did and what the kernel's own
per-namespace counters (/proc/net/snmp) say. Odd sizes and prime-ish counts make off-by-one
errors visible. Every query is filtered by the test's own pods (netns label), since other
traffic may run on the machine at the same time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import psutil
import pytest

from tests.integration.agent_proc import AgentProcess
from tests.integration.pods import Pod

WORKLOAD = str(Path(__file__).with_name("tcp_workload.py"))


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with AgentProcess() as a:
        cpu0, _ = a.usage()
        yield a
        cpu1, rss = a.usage()
        print(f"\nagent during test_tcp_l4: {cpu1 - cpu0:.2f} CPU-s, RSS {rss / 2**20:.1f} MiB")


def run_json(pod: Pod, *args: str, timeout: float = 120) -> Dict:
    out = pod.run([sys.executable, WORKLOAD, *args], timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_listener(pod: Pod, *args: str) -> subprocess.Popen:
    proc = pod.popen([sys.executable, WORKLOAD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "listening", proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen) -> Dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def tcp_delta(pod: Pod, before: Dict[str, int], key: str) -> int:
    return pod.snmp()["Tcp"][key] - before[key]


def of(pod: Pod) -> Dict[str, str]:
    """Labels that identify a pod's series. The cgroup is unique per pod; the netns inode is
    not (the kernel reuses inodes of deleted namespaces), so both are used."""
    return {"netns": str(pod.netns_inode), "cgroup": "/" + pod.cgroup_relpath}


def comm_of(pid: int) -> str:
    return psutil.Process(pid).name()[:15]


def test_connections_and_bytes_exact_ipv4(node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("srv"), node.add_pod("cli")
    n, up, down = 1009, 4099, 613
    s0, c0 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
    server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8080",
                            "--count", str(n), "--recv", str(up), "--send", str(down))
    server_comm = comm_of(server.pid)
    result = run_json(cli, "client", "--host", srv.ipv4, "--port", "8080", "--count", str(n), "--send", str(up))
    assert finish(server) == {"accepted": n, "received": n * up, "sent": n * down}
    assert result == {"connections": n, "sent": n * up, "received": n * down}
    # Ground truth from the kernel of each namespace.
    assert tcp_delta(cli, c0, "ActiveOpens") == n
    assert tcp_delta(srv, s0, "PassiveOpens") == n

    out = dict(**of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8080")
    assert agent.wait_total("meshlens_tcp_connections_closed_total", n, **out) == n
    assert agent.total("meshlens_tcp_connections_opened_total", **out) == n
    assert agent.total("meshlens_tcp_sent_bytes_total", **out) == n * up
    assert agent.total("meshlens_tcp_received_bytes_total", **out) == n * down
    assert agent.total("meshlens_tcp_connect_duration_seconds_count", **out) == n
    assert agent.total("meshlens_tcp_connection_duration_seconds_count", **out) == n
    assert agent.total("meshlens_tcp_rtt_seconds_count", **out) == n
    assert agent.total("meshlens_tcp_connections_active", **out) == 0

    inb = dict(**of(srv), direction="inbound", network_peer_address=cli.ipv4, server_port="8080")
    assert agent.wait_total("meshlens_tcp_connections_closed_total", n, **inb) == n
    assert agent.total("meshlens_tcp_connections_opened_total", **inb) == n
    assert agent.total("meshlens_tcp_received_bytes_total", **inb) == n * up
    assert agent.total("meshlens_tcp_sent_bytes_total", **inb) == n * down
    # Identity: the server process and its kubelet-style cgroup, read from the socket.
    assert agent.total("meshlens_tcp_connections_closed_total", process=server_comm, **inb) == n


def test_connections_and_bytes_exact_ipv6(node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("srv6"), node.add_pod("cli6")
    n, up, down = 211, 8191, 127
    server = start_listener(srv, "server", "--host", "::", "--port", "8443",
                            "--count", str(n), "--recv", str(up), "--send", str(down))
    result = run_json(cli, "client", "--host", srv.ipv6, "--port", "8443", "--count", str(n),
                      "--send", str(up), "--parallel", "4")
    assert finish(server)["received"] == n * up
    assert result["received"] == n * down
    out = dict(**of(cli), direction="outbound", network_peer_address=srv.ipv6, server_port="8443")
    assert agent.wait_total("meshlens_tcp_connections_closed_total", n, **out) == n
    assert agent.total("meshlens_tcp_sent_bytes_total", **out) == n * up
    assert agent.total("meshlens_tcp_received_bytes_total", **out) == n * down
    inb = dict(**of(srv), direction="inbound", network_peer_address=cli.ipv6, server_port="8443")
    assert agent.wait_total("meshlens_tcp_connections_opened_total", n, **inb) == n
    assert agent.total("meshlens_tcp_received_bytes_total", **inb) == n * up


def test_refused_connects_and_resets_counted(node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("closed"), node.add_pod("knock")
    n = 7
    s0, c0 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
    outcomes = run_json(cli, "connect", "--host", srv.ipv4, "--port", "9", "--count", str(n))
    assert outcomes == {"ECONNREFUSED": n}
    assert tcp_delta(srv, s0, "OutRsts") == n  # the kernel's own count of RSTs it sent
    assert tcp_delta(cli, c0, "AttemptFails") == n
    fails = dict(**of(cli), direction="outbound", server_port="9")
    assert agent.wait_total("meshlens_tcp_connect_failures_total", n, reason="refused", **fails) == n
    assert agent.total("meshlens_tcp_resets_received_total", **fails) == n
    assert agent.total("meshlens_tcp_connections_opened_total", **fails) == 0
    # RSTs to a closed port have no socket and no cgroup: the namespace and the peer tell them apart.
    assert agent.wait_total("meshlens_tcp_resets_sent_total", n, netns=str(srv.netns_inode),
                            network_peer_address=cli.ipv4, server_port="9") == n


def test_connect_timeouts_counted_with_syn_retransmits(node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("blackhole"), node.add_pod("waiter")
    n = 3
    cli.run(["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])  # ETIMEDOUT after ~3 s
    srv.drop_packets(1.0, "ingress", match=("--dport", "7777"))
    c0 = cli.snmp()["Tcp"]
    outcomes: Dict[str, int] = {}
    procs = [cli.popen([sys.executable, WORKLOAD, "connect", "--host", srv.ipv4, "--port", "7777", "--count", "1",
                        "--timeout", "30"], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        for k, v in json.loads(out.strip().splitlines()[-1]).items():
            outcomes[k] = outcomes.get(k, 0) + v
    assert outcomes == {"ETIMEDOUT": n}
    retrans = tcp_delta(cli, c0, "RetransSegs")
    assert retrans >= n  # every SYN was retried at least once before ETIMEDOUT
    fails = dict(**of(cli), direction="outbound", server_port="7777")
    assert agent.wait_total("meshlens_tcp_connect_failures_total", n, reason="timeout", **fails) == n
    assert agent.total("meshlens_tcp_retransmitted_segments_total", **of(cli)) == retrans


def test_resets_from_zero_linger_close(node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("rst"), node.add_pod("rstc")
    n = 13
    s0 = srv.snmp()["Tcp"]
    server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8081", "--count", str(n),
                            "--recv", "101", "--reset")
    server_comm = comm_of(server.pid)
    run_json(cli, "client", "--host", srv.ipv4, "--port", "8081", "--count", str(n), "--send", "101")
    finish(server)
    sent_rsts = tcp_delta(srv, s0, "OutRsts")
    assert sent_rsts == n
    inb = dict(**of(srv), direction="inbound", server_port="8081")
    # Credited to the server process's own rollup, not to an anonymous one.
    assert agent.wait_total("meshlens_tcp_resets_sent_total", n, process=server_comm, **inb) == n
    out = dict(**of(cli), direction="outbound", server_port="8081")
    assert agent.wait_total("meshlens_tcp_resets_received_total", n, **out) == n


def test_retransmits_match_kernel_under_loss(node, agent: AgentProcess) -> None:
    snd, rcv = node.add_pod("sender"), node.add_pod("receiver")
    size = 24_000_017
    rcv.drop_packets(0.02, "ingress", match=("--dport", "5555"))
    s0 = snd.snmp()["Tcp"]
    sink = start_listener(rcv, "sink", "--host", "0.0.0.0", "--port", "5555")
    run_json(snd, "bulk", "--host", rcv.ipv4, "--port", "5555", "--send", str(size), timeout=180)
    assert finish(sink) == {"received": size}
    kernel_retrans = tcp_delta(snd, s0, "RetransSegs")
    assert kernel_retrans > 50, "the loss rule should have forced retransmits"
    assert agent.wait_total("meshlens_tcp_retransmitted_segments_total", kernel_retrans, **of(snd)) == kernel_retrans
    out = dict(**of(snd), direction="outbound", network_peer_address=rcv.ipv4, server_port="5555")
    assert agent.wait_total("meshlens_tcp_sent_bytes_total", size, **out) == size
    assert agent.wait_total("meshlens_tcp_received_bytes_total", size, **of(rcv), direction="inbound") == size
    assert agent.total("meshlens_agent_events_read_total", source="tcp", type="retransmit") > 0
    print(f"\nretransmits under 2% loss: kernel RetransSegs {kernel_retrans}, meshlens {kernel_retrans}; "
          f"{size} bytes exact both ends")


def test_agent_reports_no_losses(agent: AgentProcess) -> None:
    """After all the traffic above, the kernel counted no dropped records."""
    assert agent.total("meshlens_agent_events_lost_total", source="tcp", reason="ringbuf_full") == 0
    assert agent.total("meshlens_agent_events_lost_total", source="tcp", reason="map_full") == 0
    assert agent.total("meshlens_agent_callback_errors_total", source="tcp") == 0
    # Closes are aggregated in the kernel: no per-connection record reached user space (nobody
    # follows the stream), yet every close above was counted.
    assert agent.total("meshlens_agent_events_read_total", source="tcp", type="close") == 0
    assert agent.total("meshlens_tcp_connections_closed_total") >= 1009 * 2
