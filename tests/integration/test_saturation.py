"""Saturation with the real agent (`meshlens run --features sat`), each condition produced for
real in test pods and compared with the kernel's own account of it in that namespace:

- a backlog-1 listener that never accepts, hit by a burst of connects: overflows equal the
  ListenOverflows delta of the server pod's /proc/net/netstat; queue depth and limit equal
  what `ss -lt` prints (Recv-Q, Send-Q);
- an iptables DROP rule: netfilter drops equal the rule's packet counter (`iptables -L -v -x`);
  conntrack entries equal the namespace's nf_conntrack_count;
- a TCP reader that stops reading: zero window appears for that pod and peer (the kernel's
  TCPToZeroWindowAdv moves) and goes when it reads again (TCPFromZeroWindowAdv); a UDP
  reader that stops reading: receive-buffer drops per peer equal Udp RcvbufErrors;
- ip_local_port_range narrowed to 4 ports and 9 connects: exhaustion counted exactly as the
  connects that failed with EADDRNOTAVAIL, ports in use 4 of 4;
- connects to a closed port, a blackholed one and a rejected one (ICMP host unreachable):
  errors by errno exactly as connect() returned them;
- a ping socket that never reads its echo replies: sock:sock_rcvqueue_full per peer equals its
  drops column in /proc/net/icmp (on 6.18 UDP and raw sockets drop before that tracepoint
  fires, measured; UDP's drops are the rcvbuf_drop events above).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

from tests.integration.agent_proc import AgentProcess, held_prog_ids, loaded_programs
from tests.integration.pods import Node, Pod, read_thread_net

LISTEN_NO_ACCEPT = r"""
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.read()
"""

BURST_CONNECT = r"""
import socket, sys, time
cs = []
for _ in range(int(sys.argv[3])):
    c = socket.socket(); c.setblocking(False)
    try:
        c.connect((sys.argv[1], int(sys.argv[2])))
    except BlockingIOError:
        pass
    cs.append(c)
time.sleep(float(sys.argv[4]))
"""

UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[4])):
    s.sendto(b"u" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""

UDP_STALLED = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
sys.stdin.read()
"""

PING_STALLED = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
for seq in range(int(sys.argv[2])):  # echo requests; the replies queue up unread
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"p" * 1009, (sys.argv[1], 0))
time.sleep(0.5)
print("sent", flush=True)
sys.stdin.read()
"""

TCP_STALLED_READER = r"""
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("ready", flush=True)
c, _ = s.accept()
sys.stdin.readline()          # stalled until told to read
want, got = int(sys.argv[3]), 0
while got < want:
    got += len(c.recv(1 << 20))
print(got, flush=True)
sys.stdin.read()
"""

TCP_WRITER = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(b"w" * int(sys.argv[3]))
print("sent", flush=True)
sys.stdin.read()
"""

MANY_CONNECTS = r"""
import errno, json, socket, sys
cs, errors = [], {}
for _ in range(int(sys.argv[3])):
    c = socket.socket()
    try:
        c.connect((sys.argv[1], int(sys.argv[2])))
        cs.append(c)
    except OSError as e:
        errors[errno.errorcode[e.errno]] = errors.get(errno.errorcode[e.errno], 0) + 1
        c.close()
print(json.dumps({"connected": len(cs), "errors": errors}), flush=True)
sys.stdin.read()
"""

PARALLEL_CONNECTS = r"""
import errno, json, socket, sys, threading
errors, lock = {}, threading.Lock()
def one():
    c = socket.socket()
    try:
        c.connect((sys.argv[1], int(sys.argv[2])))
        name = "connected"
    except OSError as e:
        name = errno.errorcode[e.errno]
    with lock:
        errors[name] = errors.get(name, 0) + 1
ts = [threading.Thread(target=one) for _ in range(int(sys.argv[3]))]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(errors), flush=True)
"""


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with AgentProcess("--features", "sat", "--socket-walk-interval", "1", sweep_interval=0.2) as a:
        yield a


def py(pod: Pod, script: str, *args: object, stdin: bool = True) -> subprocess.Popen:
    return pod.popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE if stdin else None,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ready(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, f"child failed: {proc.stderr.read()}"
    return line


def wait_equal(agent_value: Callable[[], float], kernel_value: Callable[[], float], timeout: float = 15.0):
    """Poll until the agent's number equals the kernel's (both read again each time)."""
    deadline = time.monotonic() + timeout
    while True:
        a, k = agent_value(), kernel_value()
        if a == k or time.monotonic() > deadline:
            return a, k
        time.sleep(0.2)


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_listen_overflows_equal_kernel_listen_overflows(node: Node, agent: AgentProcess) -> None:
    server, client = node.add_pod("acceptq-server"), node.add_pod("acceptq-client")
    port = 7341
    before = server.netstat()["TcpExt"]
    listener = py(server, LISTEN_NO_ACCEPT, server.ipv4, port, 1)
    ready(listener)
    client.run([sys.executable, "-c", BURST_CONNECT, server.ipv4, str(port), "7", "4"])
    time.sleep(0.5)  # the client's sockets are gone: no more SYNs
    after = server.netstat()["TcpExt"]
    kernel = after["ListenOverflows"] - before["ListenOverflows"]
    ns = str(server.netns_inode)
    got, _ = wait_equal(lambda: agent.total("meshlens_tcp_listen_overflows_total", netns=ns, server_port=str(port)),
                        lambda: kernel)
    print(f"\nlisten overflows: meshlens {got:.0f}, kernel ListenOverflows {kernel} (ListenDrops "
          f"{after['ListenDrops'] - before['ListenDrops']})")
    assert kernel > 0
    assert got == kernel
    ss = server.run(["ss", "-ltnH", f"sport = :{port}"]).stdout.split()
    recv_q, send_q = int(ss[1]), int(ss[2])
    assert agent.total("meshlens_tcp_accept_queue_length", netns=ns, server_port=str(port)) == recv_q
    assert agent.total("meshlens_tcp_accept_queue_limit", netns=ns, server_port=str(port)) == send_q == 1
    print(f"accept queue: meshlens {recv_q}/{send_q}, ss Recv-Q/Send-Q {recv_q}/{send_q}")


def _iptables_packets(pod: Pod, port: int) -> int:
    out = pod.run(["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if "DROP" in line and f"dpt:{port}" in line:
            return int(line.split()[0])
    raise AssertionError(f"rule for {port} not found:\n{out}")


def test_netfilter_drops_equal_rule_counter_and_conntrack_count(node: Node, agent: AgentProcess) -> None:
    server, client = node.add_pod("nf-server"), node.add_pod("nf-client")
    port, tracked = 7351, 7352
    server.run(["iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"])
    server.run(["iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", str(tracked), "-m", "conntrack",
                "--ctstate", "NEW", "-j", "ACCEPT"])
    client.run([sys.executable, "-c", UDP_SEND, server.ipv4, str(port), "1021", "1009"])
    for _ in range(3):  # three flows (three source ports) the conntrack rule makes the kernel track
        client.run([sys.executable, "-c", UDP_SEND, server.ipv4, str(tracked), "17", "1"])
    ns = str(server.netns_inode)
    got, rule = wait_equal(lambda: agent.total("meshlens_net_drops_total", netns=ns, reason="netfilter_drop"),
                           lambda: _iptables_packets(server, port))
    print(f"\nnetfilter drops: meshlens {got:.0f}, iptables rule counter {rule} (sent 1009)")
    assert rule == 1009
    assert got == rule

    def ct_kernel() -> int:
        return int(server.in_netns(lambda: open("/proc/sys/net/netfilter/nf_conntrack_count").read()))
    ct, kernel_ct = wait_equal(lambda: agent.total("meshlens_net_conntrack_entries", netns=ns), ct_kernel)
    print(f"conntrack entries: meshlens {ct:.0f}, nf_conntrack_count {kernel_ct}")
    assert kernel_ct >= 3 and ct == kernel_ct
    assert agent.total("meshlens_net_conntrack_limit_entries", netns=ns) == int(
        open("/proc/sys/net/netfilter/nf_conntrack_max").read())

    # the pod goes: its namespace's kernel keys are deleted, its series stop
    server.close()
    assert wait_until(lambda: not any(s.labels.get("netns") == ns for s in agent.samples()
                                      if s.name.startswith(("meshlens_net_", "meshlens_socket_"))))
    assert agent.total("meshlens_agent_kernel_events_total", source="sat", counter="keys_expired") >= 1


def test_stalled_reader_zero_window_and_rcvbuf_drops(node: Node, agent: AgentProcess) -> None:
    server, client = node.add_pod("stall-server"), node.add_pod("stall-client")
    port, total = 7361, 16 * 1024 * 1024 + 4099
    s_ns, c_ns = str(server.netns_inode), str(client.netns_inode)
    before = server.netstat()["TcpExt"]
    reader = py(server, TCP_STALLED_READER, server.ipv4, port, total)
    ready(reader)
    writer = py(client, TCP_WRITER, server.ipv4, port, total)

    def zero(ns: str, peer: str, side: str) -> float:
        return agent.total("meshlens_tcp_zero_window_connections", netns=ns, network_peer_address=peer, side=side)
    assert wait_until(lambda: zero(s_ns, client.ipv4, "local") == 1 and zero(c_ns, server.ipv4, "peer") == 1), \
        agent.log()
    stalled = server.netstat()["TcpExt"]
    to_zero = stalled["TCPToZeroWindowAdv"] - before["TCPToZeroWindowAdv"]
    print(f"\nstalled: meshlens zero-window connections server/local 1, client/peer 1; kernel TCPToZeroWindowAdv +{to_zero}")
    assert to_zero >= 1
    reader.stdin.write("read\n")
    reader.stdin.flush()
    assert int(reader.stdout.readline()) == total
    assert ready(writer) == "sent"
    assert wait_until(lambda: zero(s_ns, client.ipv4, "local") == 0 and zero(c_ns, server.ipv4, "peer") == 0)
    from_zero = server.netstat()["TcpExt"]["TCPFromZeroWindowAdv"] - before["TCPFromZeroWindowAdv"]
    print(f"reading again: meshlens zero-window connections 0/0; kernel TCPFromZeroWindowAdv +{from_zero}")
    assert from_zero >= 1

    # datagrams: a full receive buffer drops, per peer, exactly as Udp RcvbufErrors counts
    udp_port = 7362
    udp_before = server.snmp()["Udp"]["RcvbufErrors"]
    stalled_udp = py(server, UDP_STALLED, server.ipv4, udp_port)
    ready(stalled_udp)
    client.run([sys.executable, "-c", UDP_SEND, server.ipv4, str(udp_port), "1009", "211"])
    kernel = server.snmp()["Udp"]["RcvbufErrors"] - udp_before
    got, _ = wait_equal(lambda: agent.total("meshlens_socket_buffer_events_total", netns=s_ns,
                                            network_peer_address=client.ipv4, event="rcvbuf_drop",
                                            reason="socket_rcvbuff"), lambda: kernel)
    print(f"udp receive buffer full: meshlens {got:.0f}, kernel Udp RcvbufErrors +{kernel} (sent 211)")
    assert kernel > 0 and got == kernel

    # a ping socket's queue (sock_queue_rcv_skb): sock:sock_rcvqueue_full, as its drops column counts
    server.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 0"])
    pinger = py(server, PING_STALLED, client.ipv4, 223)
    assert ready(pinger) == "sent"
    ping_drops = _ping_socket_drops(server)
    got, _ = wait_equal(lambda: agent.total("meshlens_socket_buffer_events_total", netns=s_ns,
                                            network_peer_address=client.ipv4, event="rcvqueue_full"),
                        lambda: ping_drops)
    print(f"ping socket receive queue full: meshlens {got:.0f}, /proc/net/icmp drops {ping_drops} (223 echo replies)")
    assert ping_drops > 0 and got == ping_drops


def _ping_socket_drops(pod: Pod) -> int:
    """The drops column of the pod's one ping socket in /proc/net/icmp."""
    lines = pod.in_netns(read_thread_net, "icmp").splitlines()[1:]
    assert len(lines) == 1, lines
    return int(lines[0].split()[-1])


def test_ephemeral_port_exhaustion_counted_exactly(node: Node, agent: AgentProcess) -> None:
    server, client = node.add_pod("ports-server"), node.add_pod("ports-client")
    port = 7371
    client.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40003"])
    listener = py(server, LISTEN_NO_ACCEPT, server.ipv4, port, 64)
    ready(listener)
    conns = py(client, MANY_CONNECTS, server.ipv4, port, 9)
    result = json.loads(ready(conns))
    failed = result["errors"].get("EADDRNOTAVAIL", 0)
    ns = str(client.netns_inode)
    got, _ = wait_equal(lambda: agent.total("meshlens_tcp_connect_port_exhausted_total", netns=ns,
                                            network_peer_address=server.ipv4), lambda: failed)
    assert wait_until(lambda: agent.total("meshlens_net_ephemeral_ports_in_use", netns=ns) == result["connected"])
    in_use = agent.total("meshlens_net_ephemeral_ports_in_use", netns=ns)
    limit = agent.total("meshlens_net_ephemeral_ports_limit", netns=ns)
    print(f"\nport exhaustion: meshlens {got:.0f} failed connects, connect() EADDRNOTAVAIL {failed}; "
          f"ports in use {in_use:.0f}/{limit:.0f}, connected {result['connected']}")
    assert result == {"connected": 4, "errors": {"EADDRNOTAVAIL": 5}}
    assert got == failed
    assert (in_use, limit) == (4, 4)


def test_socket_errors_by_errno_counted_exactly(node: Node, agent: AgentProcess) -> None:
    server, client = node.add_pod("err-server"), node.add_pod("err-client")
    closed, blackholed, unreachable = 7381, 7382, 7383
    server.run(["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", str(blackholed), "-j", "DROP"])
    server.run(["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", str(unreachable), "-j", "REJECT",
                "--reject-with", "icmp-host-unreachable"])
    client.run(["sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1"])  # time out after ~3 s, not ~2 min
    refused = json.loads(client.run([sys.executable, "-c", PARALLEL_CONNECTS, server.ipv4, str(closed), "7"]).stdout)
    timed_out = json.loads(client.run([sys.executable, "-c", PARALLEL_CONNECTS, server.ipv4, str(blackholed),
                                       "3"]).stdout)
    no_route = json.loads(client.run([sys.executable, "-c", PARALLEL_CONNECTS, server.ipv4, str(unreachable),
                                      "5"]).stdout)
    ns = str(client.netns_inode)

    def errors(name: str) -> float:
        return agent.total("meshlens_socket_errors_total", netns=ns, network_peer_address=server.ipv4, error=name)
    got_refused, _ = wait_equal(lambda: errors("ECONNREFUSED"), lambda: refused.get("ECONNREFUSED", 0))
    got_timeout, _ = wait_equal(lambda: errors("ETIMEDOUT"), lambda: timed_out.get("ETIMEDOUT", 0))
    got_unreach, _ = wait_equal(lambda: errors("EHOSTUNREACH"), lambda: no_route.get("EHOSTUNREACH", 0))
    print(f"\nsocket errors: ECONNREFUSED meshlens {got_refused:.0f} / connect() {refused}; "
          f"ETIMEDOUT meshlens {got_timeout:.0f} / connect() {timed_out}; "
          f"EHOSTUNREACH meshlens {got_unreach:.0f} / connect() {no_route}")
    assert refused == {"ECONNREFUSED": 7} and timed_out == {"ETIMEDOUT": 3} and no_route == {"EHOSTUNREACH": 5}
    assert (got_refused, got_timeout, got_unreach) == (7, 3, 5)


SAT_PROGRAMS = {"handle_sat_kfree_skb", "handle_sat_rcvqueue_full", "handle_sat_buf_limit",
                "handle_sat_error_report", "handle_sat_set_state", "sat_iter_tcp"}


def test_sigterm_detaches_every_saturation_program() -> None:
    agent = AgentProcess("--features", "sat").start()
    try:
        assert agent.proc is not None
        programs = held_prog_ids(agent.proc.pid)
        names = set(programs.values())  # bpftool prints the BTF name, or the kernel's first 15 characters
        assert all(n in names or n[:15] in names for n in SAT_PROGRAMS), names
    finally:
        assert agent.stop() == 0
    still = set(programs) & set(loaded_programs())
    assert still == set(), f"programs still loaded after SIGTERM: {still}"
