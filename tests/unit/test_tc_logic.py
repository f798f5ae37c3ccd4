"""Pure logic of the tc pipeline, no privileges: link classification (which links get tc
programs), the Prometheus families built from a synthetic TcSnapshot (names, labels,
cumulative log2 RTT buckets, `promtool check metrics` when installed), and drop-reason names."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from meshlens.agent.kernel.drop_reasons import reason_name, short_name
from meshlens.agent.identity.model import Workload, external
from meshlens.agent.sources.tc.link_watch import KIND_MAIN, KIND_POD_VETH, classify
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.sources.tc.source import IfCounters, InterfaceInfo, RttSeries, TcSnapshot
from meshlens.agent.sources.tc.structs import RTT_SLOTS, rtt_bucket_bounds, rtt_slot
from meshlens.exporter.prometheus.collector import make_registry
from meshlens.exporter.prometheus.tc import tc_families


class FakeLinkInfo(dict):
    def get_attr(self, name):
        return self.get(name)


class FakeMsg(dict):
    def __init__(self, index, name, kind=None, nsid=None, link=0, family=0):
        super().__init__(index=index, family=family)
        self.attrs = {"IFLA_IFNAME": name, "IFLA_LINK_NETNSID": nsid, "IFLA_LINK": link,
                      "IFLA_LINKINFO": FakeLinkInfo(IFLA_INFO_KIND=kind) if kind else None}

    def get_attr(self, name):
        return self.attrs.get(name)


def test_pod_veth_is_a_veth_with_its_peer_in_another_netns() -> None:
    info = classify(FakeMsg(7, "cali123", "veth", nsid=3, link=2))
    assert info is not None and (info.kind, info.peer_ifindex, info.peer_netnsid) == (KIND_POD_VETH, 2, 3)


@pytest.mark.parametrize("msg", [
    FakeMsg(7, "veth0", "veth", nsid=None, link=8),     # both ends in this netns
    FakeMsg(7, "br0", "bridge"),
    FakeMsg(7, "eth0", None),
    FakeMsg(7, "cali1", "veth", nsid=3, family=7),      # AF_BRIDGE port notification
])
def test_other_links_are_ignored(msg) -> None:
    assert classify(msg) is None


def test_main_interface_by_name() -> None:
    assert classify(FakeMsg(2, "eth0", None), main_interface="eth0").kind == KIND_MAIN
    assert classify(FakeMsg(2, "eth1", None), main_interface="eth0") is None


WEB = Workload("shop", "web-1", "Deployment", "web")
DB = Workload("shop", "db-0", "StatefulSet", "db")
GONE = Workload("shop", "old-1", "Deployment", "old")


class FakeIdentity:
    """netns 4026530001 is web-1's, 4026530002 belongs to a pod deleted past the TTL."""

    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return {4026530001: WEB, 4026530002: GONE}.get(netns, Workload("", "", "process", process))

    def peer(self, address: str) -> Workload:
        return DB if address == "10.0.0.9" else external(address)

    def expired(self, workload: Workload) -> bool:
        return workload is GONE


def _snapshot() -> AgentSnapshot:
    slots = [0] * RTT_SLOTS
    slots[rtt_slot(150)] = 2  # two handshakes of ~150 µs
    slots[rtt_slot(3000)] = 1
    tc = TcSnapshot(
        interfaces={5: InterfaceInfo(5, "mlvabc", "pod_veth", 2, 4026530001, True),
                    6: InterfaceInfo(6, "mlvold", "pod_veth", 2, 4026530002, True)},
        counters={(5, "ingress"): IfCounters(packets=10, bytes=1500, segs=12, tcp_syn=1, tcp_fin=1),
                  (5, "egress"): IfCounters(packets=8, bytes=900, segs=8, tcp_synack=1, tcp_rst=2),
                  (6, "egress"): IfCounters(packets=1, bytes=60, segs=1)},
        rtt={(5, "client", "10.0.0.9"): RttSeries(tuple(slots), 3, 0.0033)},
        drops={(5, "pod", "netfilter_drop"): 4},
        parse_failures={"short_tcp": 2, "bad_ipv4": 0},
    )
    return AgentSnapshot(areas={"tc": tc}, health={}, attach={}, process=ProcessStats(0, 0, 0),
                         identity=FakeIdentity())


def _value(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def test_families_names_labels_values() -> None:
    reg = make_registry(_snapshot, [tc_families])
    base = {"interface": "mlvabc", "netns": "4026530001", **WEB.local_labels()}
    assert _value(reg, "meshlens_pod_interface_packets_total", **base, direction="ingress") == 10
    assert _value(reg, "meshlens_pod_interface_bytes_total", **base, direction="egress") == 900
    assert _value(reg, "meshlens_pod_interface_segments_total", **base, direction="ingress") == 12
    assert _value(reg, "meshlens_pod_interface_tcp_flags_total", **base, direction="egress", flag="rst") == 2
    assert _value(reg, "meshlens_pod_interface_tcp_flags_total", **base, direction="ingress", flag="syn") == 1
    assert _value(reg, "meshlens_pod_interface_drops_total", **base, side="pod", reason="netfilter_drop") == 4
    assert _value(reg, "meshlens_tc_parse_failures_total", reason="short_tcp") == 2
    assert _value(reg, "meshlens_pod_interface_info", **base, ifindex="5", kind="pod_veth", attached="true") == 1


def test_rtt_histogram_is_cumulative_over_log2_bounds() -> None:
    reg = make_registry(_snapshot, [tc_families])
    lab = {"interface": "mlvabc", "netns": "4026530001", "role": "client", "network_peer_address": "10.0.0.9",
           **WEB.local_labels(), **DB.peer_labels()}
    name = "meshlens_pod_interface_handshake_rtt_seconds"
    bounds = rtt_bucket_bounds()
    assert _value(reg, f"{name}_count", **lab) == 3
    assert _value(reg, f"{name}_sum", **lab) == pytest.approx(0.0033)
    assert _value(reg, f"{name}_bucket", **lab, le=repr(bounds[rtt_slot(150) - 1])) == 0
    assert _value(reg, f"{name}_bucket", **lab, le=repr(bounds[rtt_slot(150)])) == 2
    assert _value(reg, f"{name}_bucket", **lab, le=repr(bounds[rtt_slot(3000)])) == 3
    assert _value(reg, f"{name}_bucket", **lab, le="+Inf") == 3


def test_series_of_a_pod_deleted_past_the_ttl_are_not_exported() -> None:
    text = generate_latest(make_registry(_snapshot, [tc_families])).decode()
    assert "mlvabc" in text and "mlvold" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_output() -> None:
    text = generate_latest(make_registry(_snapshot, [tc_families]))
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stderr.decode() + res.stdout.decode()


def test_no_tc_area_builds_nothing() -> None:
    assert tc_families(AgentSnapshot(areas={}, health={}, attach={}, process=ProcessStats(0, 0, 0))) == []


def test_drop_reason_names() -> None:
    assert short_name("SKB_DROP_REASON_NETFILTER_DROP") == "netfilter_drop"
    assert reason_name(12, {12: "netfilter_drop"}) == "netfilter_drop"
    assert reason_name(999, {}) == "reason_999"
