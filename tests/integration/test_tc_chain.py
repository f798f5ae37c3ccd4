"""One tc filter per hook (agent/sources/tc/chain.py) with the real agent (`meshlens run`):
with tc and the packet L7 path both on, each pod veth carries only the two counter filters
and the counters tail-call the L7 parser; the HTTP counts still equal nginx's access log on
both sides and the interface counts the veth's own. Each half still works alone: the L7
path without tc attaches its own filters and counts the same; tc without L7 counts exactly
and calls nothing.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Dict, List

import pytest

from tests.integration.agent_proc import AgentProcess
from tests.integration.pods import Node, Pod
from tests.integration.servers import Nginx
from tests.integration.test_tc_pods import agent_iface, delta, link_stats, pair_delta, wait_attached, warm_up

REQUESTS, SIZE = 233, 4099
CLIENT = r'''
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=30)
for _ in range(int(sys.argv[2])):
    c.request("GET", "/bytes/%s" % sys.argv[3])
    r = c.getresponse()
    assert len(r.read()) == int(sys.argv[3])
print("done")
'''


def meshlens_filters(ifname: str, pid: int) -> List[str]:
    """Names of this agent's filters on ifname, both hooks (the handle carries its pid in the
    low 22 bits, whatever attacher number sits above them)."""
    names = []
    for hook in ("ingress", "egress"):
        out = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True).stdout
        for ln in out.splitlines():
            parts = ln.split()
            if "handle" not in parts or "meshlens-" not in ln:
                continue
            handle = int(parts[parts.index("handle") + 1], 16)
            if handle & 0x3FFFFF == pid & 0x3FFFFF:
                names.append(next(p for p in parts if p.startswith("meshlens-")))
    return sorted(names)


def http_count(agent: AgentProcess, role: str, pod: Pod) -> float:
    return agent.total(f"http_{role}_request_duration_seconds_count", netns=str(pod.netns_inode))


def iface_totals(agent: AgentProcess, pod: Pod) -> tuple:
    import time

    for _ in range(50):
        link = link_stats(pod.host_veth)
        time.sleep(0.5)
        ours = agent_iface(agent, pod.host_veth)
        if link == link_stats(pod.host_veth) and ours == agent_iface(agent, pod.host_veth):
            return ours, link
    raise AssertionError(f"{pod.host_veth} never went quiet")


MODES: Dict[str, tuple] = {
    # args, filters expected per veth, L7 counted, tc counted
    "tc+l7 chained": ((), ["meshlens-tc-egress", "meshlens-tc-ingress"], True, True),
    "l7 alone": (("--features", "l4,l7"), ["meshlens-l7-egress", "meshlens-l7-ingress"], True, False),
    "tc alone": (("--features", "l4,tc"), ["meshlens-tc-egress", "meshlens-tc-ingress"], False, True),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_one_filter_per_hook_and_each_half_alone(node: Node, mode: str) -> None:
    args, filters, l7_on, tc_on = MODES[mode]
    web, client = node.add_pod("tch-web"), node.add_pod("tch-cli")
    with Nginx(web, byte_sizes=(SIZE,)) as nginx, AgentProcess("--l7-source", "packets", *args,
                                                                 sweep_interval=0.1) as agent:
        pid = agent.proc.pid
        if tc_on:
            wait_attached(agent, web)
            wait_attached(agent, client)
        else:
            import time

            deadline = time.monotonic() + 10
            while len(meshlens_filters(web.host_veth, pid)) < 2 or len(meshlens_filters(client.host_veth, pid)) < 2:
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.05)
        for pod in (web, client):
            assert meshlens_filters(pod.host_veth, pid) == filters, agent.log()
        variants = {s.labels.get("variant") for s in agent.samples()
                    if s.name == "meshlens_agent_attach_info" and s.labels.get("signal") == "l7_payload"
                    and s.value == 1}
        if l7_on:
            assert variants == {"tc_chained" if tc_on else "tc_packets"}, variants
        warm_up(client, web)
        before = iface_totals(agent, client) if tc_on else None
        logged0 = len(nginx.access_log_entries())
        out = client.run([sys.executable, "-c", CLIENT, web.ipv4, str(REQUESTS), str(SIZE)], timeout=120)
        assert out.stdout.strip() == "done"
        logged = len(nginx.access_log_entries(expect=logged0 + REQUESTS)) - logged0
        assert logged == REQUESTS
        if l7_on:
            assert agent.wait_total("http_server_request_duration_seconds_count", REQUESTS,
                                    netns=str(web.netns_inode)) == REQUESTS, agent.log()
            assert agent.wait_total("http_client_request_duration_seconds_count", REQUESTS,
                                    netns=str(client.netns_inode)) == REQUESTS, agent.log()
        else:
            assert http_count(agent, "server", web) == 0 and http_count(agent, "client", client) == 0
        if tc_on:
            after = iface_totals(agent, client)
            ours, link = delta(after[0], before[0]), delta(after[1], before[1])
            pair_delta(ours, link)
            assert ours["egress_bytes"] > REQUESTS * SIZE
        else:
            assert agent_iface(agent, client.host_veth) == {}


def test_a_veth_tc_cannot_attach_to_is_left_to_cgroup_skb(node: Node) -> None:
    """Chained, the L7 parser runs only inside the tc counter filters. A veth they cannot be
    attached to (here a real `ingress` qdisc, left by another tool, holds its ingress hook)
    must not be claimed for the packet path: its pod's sockets stay with cgroup_skb, which
    counts its side exactly (and names the process, which tc cannot), while the other pod's
    side is parsed at its veth as usual."""
    web, client = node.add_pod("tcf-web"), node.add_pod("tcf-cli")
    # another agent on this machine (a developer's, a concurrent suite's) may already have put
    # its clsact on the new veth: the ingress qdisc goes in its place
    subprocess.run(["tc", "qdisc", "del", "dev", web.host_veth, "clsact"], capture_output=True)
    subprocess.run(["tc", "qdisc", "add", "dev", web.host_veth, "ingress"], check=True)
    # the agent first: nginx's sockets are then made under its cgroup/sock_create, which names them
    with AgentProcess(sweep_interval=0.1) as agent, Nginx(web, byte_sizes=(SIZE,)) as nginx:
        wait_attached(agent, client)
        assert agent.wait_total("meshlens_pod_interface_info", 1, interface=web.host_veth, attached="false") == 1
        assert meshlens_filters(web.host_veth, agent.proc.pid) == [], "nothing of ours on the veth"
        warm_up(client, web)
        srv0 = {s.labels.get("process", ""): s.value for s in agent.samples()
                if s.name == "http_server_request_duration_seconds_count" and s.labels.get("netns") == str(web.netns_inode)}
        cli0 = http_count(agent, "client", client)
        logged0 = len(nginx.access_log_entries())
        out = client.run([sys.executable, "-c", CLIENT, web.ipv4, str(REQUESTS), str(SIZE)], timeout=120)
        assert out.stdout.strip() == "done"
        assert len(nginx.access_log_entries(expect=logged0 + REQUESTS)) - logged0 == REQUESTS
        assert agent.wait_total("http_client_request_duration_seconds_count", cli0 + REQUESTS,
                                netns=str(client.netns_inode)) == cli0 + REQUESTS, agent.log()
        total0 = sum(srv0.values())
        assert agent.wait_total("http_server_request_duration_seconds_count", total0 + REQUESTS,
                                netns=str(web.netns_inode)) == total0 + REQUESTS, agent.log()
        srv = {s.labels.get("process", ""): s.value - srv0.get(s.labels.get("process", ""), 0) for s in agent.samples()
               if s.name == "http_server_request_duration_seconds_count" and s.labels.get("netns") == str(web.netns_inode)}
        assert {p: n for p, n in srv.items() if n} == {"nginx": REQUESTS}, "parsed by cgroup_skb, in nginx's name"
    subprocess.run(["tc", "qdisc", "del", "dev", web.host_veth, "ingress"], capture_output=True)
