"""Counter slots of the tc programs on real pod veths: the tc source in this process with a
slot table of one, fed the test's own veths (the link watch off, so veths of other sessions
on this machine cannot take the slot), real traffic, and the interface's own counters
(`ip -s -j link`) as ground truth.

- A veth that goes away gives its slot to the next one: the next veth's counts start from
  its own first packet (nothing carried over from the previous holder, whose 1009 datagrams
  were counted exactly) and every one of its packets is counted (nothing lost).
- A veth beyond the slot table is attached without a slot and still counted exactly, in the
  `ifstats` hash; the source says so (`interfaces_without_slot`, `unslotted_packets`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Dict, Iterator, Tuple

import pytest
from pyroute2 import IPRoute

from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.tc.link_watch import LinkInfo, classify
from meshlens.agent.sources.tc.source import TcConfig, TcSource
from tests.integration.pods import Node, Pod
from tests.integration.test_tc_pods import UDP_SEND, link_stats

ETH, IPV4, UDP = 14, 20, 8


@pytest.fixture
def one_slot() -> Iterator[TcSource]:
    src = TcSource(TcConfig(interface_slots=1), KernelFeatures.probe(), watch=False)
    src.start()
    try:
        yield src
    finally:
        src.stop()


def link_of(pod: Pod) -> LinkInfo:
    with IPRoute() as ipr:
        info = classify(ipr.get_links(ifname=pod.host_veth)[0])
    assert info is not None, f"{pod.host_veth} is not a pod veth"
    return info


def ours(src: TcSource, ifindex: int) -> Dict[str, int]:
    src.sweep(0)
    c = src.snapshot().counters
    return {f"{d}_{k}": getattr(c[(ifindex, d)], k) if (ifindex, d) in c else 0
            for d in ("ingress", "egress") for k in ("packets", "bytes")}


def theirs(pod: Pod) -> Dict[str, int]:
    s = link_stats(pod.host_veth)  # host side: rx = what the pod sent = our ingress
    return {"ingress_packets": s["rx_packets"], "ingress_bytes": s["rx_bytes"],
            "egress_packets": s["tx_packets"], "egress_bytes": s["tx_bytes"]}


def settled(src: TcSource, pod: Pod, ifindex: int, timeout: float = 10.0) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Our counters and the link's, read while nothing crosses the veth (two equal reads)."""
    deadline = time.monotonic() + timeout
    prev = None
    while time.monotonic() < deadline:
        cur = (ours(src, ifindex), theirs(pod))
        if cur == prev:
            return cur
        prev = cur
        time.sleep(0.3)
    raise AssertionError(f"{pod.host_veth} never went quiet: {prev}")


def quiet(pod: Pod, node: Node) -> None:
    """Only the test's datagrams cross the veth: no IPv6 on the pod's eth0 (router
    solicitations, and the MLD reports and DAD probes that arrive up to seconds after the
    address, counted 2 packets too many in one run), and the neighbours pinned on both
    sides (no ARP around the datagrams and the node's ICMP answers). The test is IPv4."""
    pod.run(["sysctl", "-q", "-w", "net.ipv6.conf.eth0.router_solicitations=0",
             "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.eth0.disable_ipv6=1"])
    mac = json.loads(subprocess.run(["ip", "-j", "link", "show", "dev", node.bridge], capture_output=True,
                                    text=True, check=True).stdout)[0]["address"]
    pod.run(["ip", "neigh", "replace", node.gateway_v4, "lladdr", mac, "dev", "eth0", "nud", "permanent"])
    pod_mac = json.loads(pod.run(["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]["address"]
    subprocess.run(["ip", "neigh", "replace", pod.ipv4, "lladdr", pod_mac, "dev", node.bridge, "nud", "permanent"],
                   check=True)


def send(pod: Pod, node: Node, size: int, count: int) -> None:
    """`count` UDP datagrams of `size` bytes from the pod to the node's bridge address (a
    closed port: the node answers with ICMP, which the veth's counters see too)."""
    pod.run([sys.executable, "-c", UDP_SEND, node.gateway_v4, "9", str(size), str(count)])


def delta(after: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_slot_reuse_carries_nothing_over_and_loses_nothing(node: Node, one_slot: TcSource) -> None:
    first = node.add_pod("tsl-a")
    quiet(first, node)
    a = link_of(first)
    one_slot.link_up(a)
    assert one_slot.interfaces()[a.ifindex].slot == 1
    before = settled(one_slot, first, a.ifindex)
    send(first, node, 4099, 1009)
    after = settled(one_slot, first, a.ifindex)
    got, truth = delta(after[0], before[0]), delta(after[1], before[1])
    assert got == truth
    assert got["ingress_packets"] >= 1009 * 3  # 4099-byte datagrams leave the pod in 3 fragments
    first_total = after[0]["ingress_packets"]

    first.close()
    one_slot.link_gone(a.ifindex)
    second = node.add_pod("tsl-b")
    quiet(second, node)
    b = link_of(second)
    one_slot.link_up(b)
    assert one_slot.interfaces()[b.ifindex].slot == 1, "the freed slot goes to the next veth"
    start = settled(one_slot, second, b.ifindex)
    # Nothing carried over: what we count is at most what crossed the new veth since it
    # was made (its own counters also hold what crossed before we attached).
    for k, v in start[0].items():
        assert v <= start[1][k], (k, start)
    assert start[0]["ingress_packets"] < first_total
    send(second, node, 613, 211)
    end = settled(one_slot, second, b.ifindex)
    got, truth = delta(end[0], start[0]), delta(end[1], start[1])
    assert got == truth, "every packet on the new holder of the slot is counted"
    assert got["ingress_packets"] == 211
    assert got["ingress_bytes"] == 211 * (613 + UDP + IPV4 + ETH)
    assert one_slot.health().kernel_counters["interfaces_without_slot"] == 0


def test_interface_beyond_the_slot_table_is_counted_and_said(node: Node, one_slot: TcSource) -> None:
    holder, extra = node.add_pod("tsx-a"), node.add_pod("tsx-b")
    for p in (holder, extra):
        quiet(p, node)
    a, b = link_of(holder), link_of(extra)
    one_slot.link_up(a)
    one_slot.link_up(b)
    one_slot.link_up(b)  # a repeated notification neither takes a slot nor counts twice
    assert one_slot.interfaces()[a.ifindex].slot == 1
    info = one_slot.interfaces()[b.ifindex]
    assert info.slot == 0 and info.attached
    health = one_slot.health().kernel_counters
    assert health["interfaces_without_slot"] == 1
    before = settled(one_slot, extra, b.ifindex)
    send(extra, node, 1000, 307)
    after = settled(one_slot, extra, b.ifindex)
    got, truth = delta(after[0], before[0]), delta(after[1], before[1])
    assert got == truth
    assert got["ingress_packets"] == 307
    assert got["ingress_bytes"] == 307 * (1000 + UDP + IPV4 + ETH)
    health = one_slot.health().kernel_counters
    assert health["unslotted_packets"] == after[0]["ingress_packets"] + after[0]["egress_packets"]
    assert one_slot.health().map_entries["tc_if_slots"] == 1
