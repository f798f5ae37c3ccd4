"""tc programs on real pod veths with the real agent (`meshlens run`): byte and packet counts
agree with what the test sent (headers computed) and, exactly, with the interface's own
counters (`ip -s -j link`; host-side rx = pod egress = our ingress); TCP flags and handshake
RTTs match the connections made; drops inside a pod are attributed by reason; a veth created
after the agent started is attached within a second; other tc filters survive our detach;
SIGTERM and SIGKILL+restart leave no meshlens filter behind and never a doubled one.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Tuple

import pytest
from pyroute2 import IPRoute

from meshlens.agent.kernel import bpf
from tests.integration.agent_proc import AgentProcess
from tests.integration.pods import Node, Pod
from tests.integration.test_tcp_l4 import finish, run_json, start_listener

ETH, IPV4, IPV6, UDP = 14, 20, 40, 8
TC_NAME = "meshlens-tc-"

UDP_SEND = r"""
import socket, sys
host, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"u" * size, (host, port))
"""

UDP_RECV = r"""
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((host, port))
print("listening", flush=True)
s.settimeout(10)
got = 0
try:
    while got < count:
        s.recv(65536)
        got += 1
except socket.timeout:
    pass
print(got, flush=True)
"""


# --------------------------------------------------------------------------- helpers

def link_stats(ifname: str) -> Dict[str, int]:
    out = subprocess.run(["ip", "-s", "-j", "link", "show", "dev", ifname], capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)[0]["stats64"]
    return {"rx_bytes": s["rx"]["bytes"], "rx_packets": s["rx"]["packets"],
            "tx_bytes": s["tx"]["bytes"], "tx_packets": s["tx"]["packets"]}


def tc_filters(ifname: str, agent: AgentProcess | int) -> List[str]:
    """`tc filter show` lines (both hooks) of one agent's filters on ifname: the handle is the
    agent's pid. Other agents running on this machine (other test sessions) attach their own
    filters to every pod veth too; those are not this test's business."""
    pid = agent if isinstance(agent, int) else agent.proc.pid
    lines = []
    for hook in ("ingress", "egress"):
        out = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True).stdout
        lines += [f"{hook}: {ln.strip()}" for ln in out.splitlines() if TC_NAME in ln and f" handle {pid:#x} " in ln]
    return lines


def all_filters(ifname: str, hook: str) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True).stdout


def agent_iface(agent: AgentProcess, ifname: str) -> Dict[str, float]:
    """The agent's packet/byte totals for one interface, both directions."""
    out = {}
    for s in agent.samples():
        if s.labels.get("interface") != ifname:
            continue
        if s.name in ("meshlens_pod_interface_packets_total", "meshlens_pod_interface_bytes_total"):
            kind = "packets" if "packets" in s.name else "bytes"
            out[f"{s.labels['direction']}_{kind}"] = s.value
    return out


def wait_attached(agent: AgentProcess, pod: Pod, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.total("meshlens_pod_interface_info", interface=pod.host_veth, attached="true") == 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"{pod.host_veth} never attached:\n{agent.log()}")


def settled(agent: AgentProcess, pod: Pod, timeout: float = 10.0) -> Tuple[Dict[str, float], Dict[str, int]]:
    """Agent totals and interface counters read while nothing moves (two equal rounds)."""
    deadline = time.monotonic() + timeout
    prev = None
    while time.monotonic() < deadline:
        link = link_stats(pod.host_veth)
        time.sleep(0.5)  # > 2 sweeps
        ours = agent_iface(agent, pod.host_veth)
        again = link_stats(pod.host_veth)
        cur = (ours, link)
        if link == again and cur == prev:
            return ours, link
        prev = cur
    raise AssertionError(f"counters of {pod.host_veth} never settled: {prev}")


def delta(after: Dict, before: Dict) -> Dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def pair_delta(agent_d: Dict[str, float], link_d: Dict[str, int]) -> None:
    """Our ingress is the host side's rx (what the pod sent); our egress its tx."""
    assert agent_d["ingress_packets"] == link_d["rx_packets"], (agent_d, link_d)
    assert agent_d["ingress_bytes"] == link_d["rx_bytes"], (agent_d, link_d)
    assert agent_d["egress_packets"] == link_d["tx_packets"], (agent_d, link_d)
    assert agent_d["egress_bytes"] == link_d["tx_bytes"], (agent_d, link_d)


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    with AgentProcess(sweep_interval=0.1) as a:
        yield a


def _mac(pod: Pod) -> str:
    return json.loads(pod.run(["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]["address"]


def warm_up(a: Pod, b: Pod, quiet_after_s: float = 3.0) -> None:
    """Make the pods silent but for the test's traffic: no router solicitations, neighbour
    entries pinned (no ARP/ND), and the MLD reports that follow address setup (two, at most
    1 s apart) already sent."""
    born = time.monotonic()
    for pod in (a, b):
        pod.run(["sysctl", "-q", "-w", "net.ipv6.conf.eth0.router_solicitations=0", "net.ipv6.conf.all.router_solicitations=0"])
        # the host sides too: this kernel's default (-1) solicits forever, with back-off, and
        # a host-side veth's or the bridge's RS lands on the pod link in the middle of a test
        master = json.loads(subprocess.run(["ip", "-j", "link", "show", "dev", pod.host_veth],
                                           capture_output=True, text=True).stdout)[0].get("master")
        for dev in filter(None, (pod.host_veth, master)):
            subprocess.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.router_solicitations=0"], check=False)
    for me, other in ((a, b), (b, a)):
        mac = _mac(other)
        for addr in (other.ipv4, other.ipv6):
            me.run(["ip", "neigh", "replace", addr, "lladdr", mac, "dev", "eth0", "nud", "permanent"])
    a.run(["ping", "-c", "1", "-W", "2", b.ipv4])
    a.run(["ping", "-6", "-c", "1", "-W", "2", b.ipv6])
    time.sleep(max(0.0, quiet_after_s - (time.monotonic() - born)))


# --------------------------------------------------------------------------- byte agreement

def test_udp_bytes_match_sent_and_interface_counters(node: Node, agent: AgentProcess) -> None:
    a, b = node.add_pod("tcu-a"), node.add_pod("tcu-b")
    wait_attached(agent, a)
    wait_attached(agent, b)
    warm_up(a, b)
    n4, size4, n6, size6 = 500, 1000, 300, 1200
    before = settled(agent, a)
    # a -> b over IPv4 (ingress on a's veth), b -> a over IPv6 (egress on a's veth)
    rx4 = b.popen([sys.executable, "-c", UDP_RECV, b.ipv4, "6001", str(n4)], stdout=subprocess.PIPE, text=True)
    rx6 = a.popen([sys.executable, "-c", UDP_RECV, a.ipv6, "6002", str(n6)], stdout=subprocess.PIPE, text=True)
    assert rx4.stdout.readline().strip() == "listening" and rx6.stdout.readline().strip() == "listening"
    a.run([sys.executable, "-c", UDP_SEND, b.ipv4, "6001", str(size4), str(n4)])
    b.run([sys.executable, "-c", UDP_SEND, a.ipv6, "6002", str(size6), str(n6)])
    assert int(rx4.communicate(timeout=20)[0].strip()) == n4
    assert int(rx6.communicate(timeout=20)[0].strip()) == n6
    after = settled(agent, a)
    ours, link = delta(after[0], before[0]), delta(after[1], before[1])
    pair_delta(ours, link)
    # What the test sent, with headers computed: nothing else crossed the veth.
    assert ours["ingress_packets"] == n4
    assert ours["ingress_bytes"] == n4 * (size4 + UDP + IPV4 + ETH)
    assert ours["egress_packets"] == n6
    assert ours["egress_bytes"] == n6 * (size6 + UDP + IPV6 + ETH)


def test_tcp_counts_flags_and_handshake_rtt(node: Node, agent: AgentProcess) -> None:
    srv, cli = node.add_pod("tct-s"), node.add_pod("tct-c")
    wait_attached(agent, srv)
    wait_attached(agent, cli)
    warm_up(cli, srv)
    before = settled(agent, cli)
    flags0 = {(s.labels["direction"], s.labels["flag"]): s.value for s in agent.samples()
              if s.name == "meshlens_pod_interface_tcp_flags_total" and s.labels.get("interface") == cli.host_veth}
    n, up, down = 23, 50_000, 3_000
    server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8093", "--count", str(n),
                            "--recv", str(up), "--send", str(down))
    run_json(cli, "client", "--host", srv.ipv4, "--port", "8093", "--count", str(n), "--send", str(up))
    finish(server)
    refused = run_json(cli, "connect", "--host", srv.ipv4, "--port", "8094", "--count", "1")
    after = settled(agent, cli)
    ours, link = delta(after[0], before[0]), delta(after[1], before[1])
    pair_delta(ours, link)  # TCP: exact agreement with the kernel's own per-interface counts
    assert ours["ingress_bytes"] > n * up and ours["egress_bytes"] > n * down
    flags = {(s.labels["direction"], s.labels["flag"]): s.value - flags0.get((s.labels["direction"], s.labels["flag"]), 0)
             for s in agent.samples()
             if s.name == "meshlens_pod_interface_tcp_flags_total" and s.labels.get("interface") == cli.host_veth}
    assert flags[("ingress", "syn")] == n + 1, (flags, refused)       # the client's SYNs (+1 refused)
    assert flags[("egress", "synack")] == n                           # the server's answers
    assert flags[("egress", "rst")] == 1                              # the refusal
    assert flags[("ingress", "fin")] == n and flags[("egress", "fin")] == n
    assert flags[("ingress", "synack")] == 0 and flags[("egress", "syn")] == 0
    rtt = "meshlens_pod_interface_handshake_rtt_seconds"
    lab = {"interface": cli.host_veth, "role": "client", "network_peer_address": srv.ipv4}
    assert agent.total(f"{rtt}_count", **lab) == n
    assert 0 < agent.total(f"{rtt}_sum", **lab) < n * 0.1
    # The server's veth sees the same handshakes from the other side.
    lab_srv = {"interface": srv.host_veth, "role": "server", "network_peer_address": cli.ipv4}
    assert agent.total(f"{rtt}_count", **lab_srv) == n


def test_drops_inside_a_pod_are_attributed(node: Node, agent: AgentProcess) -> None:
    a, b = node.add_pod("tcd-a"), node.add_pod("tcd-b")
    wait_attached(agent, a)
    wait_attached(agent, b)
    warm_up(a, b)
    b.drop_packets(1.0, "ingress", "udp", match=("--dport", "6003"))
    lab = {"interface": b.host_veth, "side": "pod", "reason": "netfilter_drop"}
    before = agent.total("meshlens_pod_interface_drops_total", **lab)
    n = 37
    a.run([sys.executable, "-c", UDP_SEND, b.ipv4, "6003", "100", str(n)])
    assert agent.wait_total("meshlens_pod_interface_drops_total", before + n, **lab) == before + n


# --------------------------------------------------------------------------- discovery

def test_new_veth_is_attached_within_a_second(node: Node, agent: AgentProcess) -> None:
    node.add_pod("tcn-warm")  # the bridge and first pod exist before we time anything
    started = time.monotonic()
    pod = node.add_pod("tcn-new")
    created = time.monotonic()
    while not tc_filters(pod.host_veth, agent) and time.monotonic() - started < 5:
        time.sleep(0.01)
    attached = time.monotonic()
    assert len(tc_filters(pod.host_veth, agent)) == 2
    # The veth appeared somewhere inside add_pod: this bounds the delay from above.
    assert attached - started < 1.0, f"attached {attached - created:.3f}s after add_pod returned ({created - started:.3f}s)"
    wait_attached(agent, pod)
    assert agent.total("meshlens_pod_interface_info", interface=pod.host_veth, netns=str(pod.netns_inode)) == 1


def test_removed_veth_is_forgotten(node: Node, agent: AgentProcess) -> None:
    pod = node.add_pod("tcr")
    wait_attached(agent, pod)
    name = pod.host_veth
    pod.close()
    deadline = time.monotonic() + 5
    while agent.total("meshlens_pod_interface_info", interface=name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.total("meshlens_pod_interface_info", interface=name) == 0
    assert agent.total("meshlens_pod_interface_packets_total", interface=name) == 0


# --------------------------------------------------------------------------- coexistence and lifecycle

def test_foreign_filters_and_qdisc_survive_our_detach(node: Node) -> None:
    """Someone else's clsact + u32 filter before the agent, and someone else's bpf filter
    added after the agent on the clsact the agent created: both survive SIGTERM, and so do
    both qdiscs (the first is not ours; the second still carries a foreign filter)."""
    shared, ours_first = node.add_pod("tcf-shared"), node.add_pod("tcf-ours")
    # (Another agent on this machine may have added the clsact already: then it is theirs.)
    subprocess.run(["tc", "qdisc", "add", "dev", shared.host_veth, "clsact"], capture_output=True)
    assert "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", shared.host_veth], capture_output=True, text=True).stdout
    subprocess.run(["tc", "filter", "add", "dev", shared.host_veth, "ingress", "protocol", "all", "prio", "10",
                    "u32", "match", "u32", "0", "0", "flowid", "1:1"], check=True)
    foreign = bpf.BpfObject(bpf.object_path("tc"))
    try:
        foreign.program("handle_tc_kfree_skb").autoload = False
        foreign.load()
        agent = AgentProcess().start()
        pid = agent.proc.pid
        try:
            wait_attached(agent, shared)
            wait_attached(agent, ours_first)
            assert len(tc_filters(shared.host_veth, pid)) == 2
            assert " u32 " in all_filters(shared.host_veth, "ingress")
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=ours_first.host_veth)[0]
                ipr.tc("add-filter", "bpf", index, 7, fd=foreign.program("meshlens_tc_eg").fd, name="foreign-bpf",
                       parent=0xFFFFFFF3, classid=1, direct_action=True, prio=1, protocol=3)
            shared.run(["ping", "-c", "2", "-i", "0.2", node.gateway_v4])  # traffic passes all filters
        finally:
            assert agent.stop(signal.SIGTERM) == 0
        for pod in (shared, ours_first):
            assert tc_filters(pod.host_veth, pid) == []
            assert "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", pod.host_veth],
                                              capture_output=True, text=True).stdout
        assert " u32 " in all_filters(shared.host_veth, "ingress")
        assert "foreign-bpf" in all_filters(ours_first.host_veth, "egress")
    finally:
        subprocess.run(["tc", "filter", "del", "dev", ours_first.host_veth, "egress", "prio", "1"], capture_output=True)
        foreign.close()


def test_qdisc_we_created_is_removed_on_sigterm(node: Node) -> None:
    """The clsact the agent created goes with its filters, unless a filter of someone else
    (e.g. another agent of a concurrent test session) still sits on it."""
    pod = node.add_pod("tcq")
    with AgentProcess() as agent:
        pid = agent.proc.pid
        wait_attached(agent, pod)
        assert len(tc_filters(pod.host_veth, pid)) == 2
    assert tc_filters(pod.host_veth, pid) == []
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", pod.host_veth], capture_output=True, text=True).stdout
    others = all_filters(pod.host_veth, "ingress") + all_filters(pod.host_veth, "egress")
    assert "clsact" not in qdisc or "handle" in others, (qdisc, others)


def test_sigkill_then_restart_never_doubles_filters(node: Node) -> None:
    pod = node.add_pod("tck")
    crashed = AgentProcess().start()
    wait_attached(crashed, pod)
    crashed_pid = crashed.proc.pid
    crashed.stop(signal.SIGKILL)
    assert len(tc_filters(pod.host_veth, crashed_pid)) == 2  # a crash leaves them attached
    with AgentProcess() as agent:
        pid = agent.proc.pid
        wait_attached(agent, pod)
        assert tc_filters(pod.host_veth, crashed_pid) == [], "the crashed agent's filters were not removed"
        assert len(tc_filters(pod.host_veth, pid)) == 2
        every = [ln for h in ("ingress", "egress") for ln in all_filters(pod.host_veth, h).splitlines() if TC_NAME in ln]
        assert len(every) == len(set(every)), every
        assert agent.total("meshlens_agent_kernel_events_total", source="tc", counter="stale_filters_removed") >= 2
        # and it counts: traffic through the re-attached filters shows up
        pod.run(["ping", "-c", "3", "-i", "0.2", node.gateway_v4])
        deadline = time.monotonic() + 5
        while agent.total("meshlens_pod_interface_packets_total", interface=pod.host_veth, direction="ingress") < 3:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
    assert tc_filters(pod.host_veth, pid) == []
