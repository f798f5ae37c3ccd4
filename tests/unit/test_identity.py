"""Identity resolution on the fixture cluster (tests/unit/k8s_objects): cgroup -> pod for each
kubelet naming, owner chains (ReplicaSet -> Deployment, Job -> CronJob, StatefulSet,
DaemonSet, bare and static pods), netns fallback, peers (pod IPs, endpoints on other nodes,
ClusterIPs, CIDR names, externals), tombstones and their TTL on an injected clock, standalone
naming, and the same resolver fed by the real watcher over the fake API server."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import List

import pytest

from meshlens.agent.identity.cgroups import CgroupResolver
from meshlens.agent.identity.resolver import CidrNames, IdentityResolver, normalize_address, parse_cidr_names
from meshlens.agent.identity.model import UNKNOWN, IdentityView, StandaloneIdentity, Workload, external, service
from meshlens.agent.identity.k8s_state import ClusterState
from meshlens.agent.identity.k8s_watch import Backoff, KubeWatcher, WatchConfig, api_client
from meshlens.agent.identity.netns import NetnsLocator, parse_fib_trie_local, parse_if_inet6
from tests.integration.pods import kubelet_cgroup_relpath
from tests.unit.fake_apiserver import FakeApiServer, load_objects, pod_object

FIXTURES = {"pods": "pods", "services": "services", "endpointslices": "endpointslices",
            "replicasets": "replicasets", "deployments": "deployments", "daemonsets": "daemonsets",
            "statefulsets": "statefulsets", "jobs": "jobs"}
UIDS = {  # pod name -> metadata.uid in the fixtures
    "frontend-7d4b9c6f5d-x2kq9": "3a7e1002-1c2d-4e5f-8a9b-00003a7e1002",
    "api-5f8d7b9c4-qwz7t": "3a7e1005-1c2d-4e5f-8a9b-00003a7e1005",
    "db-0": "3a7e1008-1c2d-4e5f-8a9b-00003a7e1008",
    "node-exporter-8xk2p": "3a7e100a-1c2d-4e5f-8a9b-00003a7e100a",
    "report-28745100-h7x2z": "3a7e100d-1c2d-4e5f-8a9b-00003a7e100d",
    "migrate-5tq8w": "3a7e100f-1c2d-4e5f-8a9b-00003a7e100f",
    "debug": "3a7e1010-1c2d-4e5f-8a9b-00003a7e1010",
}
STATIC_HASH = "6e1c5c5bbf9e2bd8d0b3c5df3b6a0f2a"
CID = "c0" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


def node1(objects: List[dict]) -> List[dict]:
    return [o for o in objects if (o.get("spec") or {}).get("nodeName", "node-1") == "node-1"]


def loaded_state(clock: Clock) -> ClusterState:
    state = ClusterState(clock=clock)
    for resource, fixture in FIXTURES.items():
        objs = load_objects(fixture)
        state.replace(resource, node1(objs) if resource == "pods" else objs)
    return state


class CgroupTree:
    """Kubelet-style cgroup directories under a temp dir; ids are their inode numbers, as in cgroup2."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, relpath: str) -> int:
        path = self.root / relpath
        path.mkdir(parents=True, exist_ok=True)
        return os.stat(path).st_ino


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tree(tmp_path: Path) -> CgroupTree:
    return CgroupTree(tmp_path / "cgroup")


@pytest.fixture
def resolver(clock: Clock, tree: CgroupTree) -> IdentityResolver:
    tree.root.mkdir()
    return IdentityResolver(loaded_state(clock), CgroupResolver(root=str(tree.root), clock=clock),
                            cidr_names={"10.0.0.0/8": "corp", "10.20.0.0/16": "corp-lab", "2001:db8::/32": "doc6"})


LOCAL_TABLE = [
    ("frontend-7d4b9c6f5d-x2kq9", "besteffort", "systemd", "containerd", Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")),
    ("api-5f8d7b9c4-qwz7t", "burstable", "systemd", "cri-o", Workload("shop", "api-5f8d7b9c4-qwz7t", "Deployment", "api")),
    ("db-0", "guaranteed", "cgroupfs", "containerd", Workload("shop", "db-0", "StatefulSet", "db")),
    ("node-exporter-8xk2p", "burstable", "cgroupfs", "docker", Workload("monitoring", "node-exporter-8xk2p", "DaemonSet", "node-exporter")),
    ("report-28745100-h7x2z", "besteffort", "systemd", "docker", Workload("shop", "report-28745100-h7x2z", "CronJob", "report")),
    ("migrate-5tq8w", "besteffort", "cgroupfs", "cri-o", Workload("shop", "migrate-5tq8w", "Job", "migrate")),
    ("debug", "besteffort", "systemd", "containerd", Workload("shop", "debug", "Pod", "debug")),
]


@pytest.mark.parametrize("pod,qos,driver,runtime,expected", LOCAL_TABLE, ids=[row[0] for row in LOCAL_TABLE])
def test_local_from_cgroup(resolver: IdentityResolver, tree: CgroupTree, pod: str, qos: str, driver: str,
                           runtime: str, expected: Workload) -> None:
    cgroup_id = tree.make(kubelet_cgroup_relpath(UIDS[pod], CID, qos, driver, runtime))
    assert resolver.local(cgroup_id, 0, "whatever") == expected
    assert resolver.container(cgroup_id).container_id == CID


def test_static_pod_resolves_by_config_hash(resolver: IdentityResolver, tree: CgroupTree) -> None:
    cgroup_id = tree.make(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_HASH}.slice/"
                          f"cri-containerd-{CID}.scope")
    assert resolver.local(cgroup_id, 0, "kube-apiserver") == Workload("kube-system", "kube-apiserver-node-1", "Pod",
                                                                      "kube-apiserver-node-1")


def test_standalone_naming_when_the_cgroup_names_no_known_pod(resolver: IdentityResolver, tree: CgroupTree) -> None:
    plain = tree.make("system.slice/nginx.service")
    unknown_pod = tree.make(kubelet_cgroup_relpath("99999999-9999-4999-8999-999999999999", CID))
    for cgroup_id in (plain, unknown_pod, 0, 123456789):
        assert resolver.local(cgroup_id, 0, "nginx") == Workload("", "", "process", "nginx")
    assert resolver.cgroup_path(plain) == "/system.slice/nginx.service"


def test_replicaset_unknown_falls_back_to_the_template_hash(clock: Clock, tree: CgroupTree) -> None:
    tree.root.mkdir()
    state = loaded_state(clock)
    state.replace("replicasets", [])
    r = IdentityResolver(state, CgroupResolver(root=str(tree.root)))
    assert r.peer("10.244.1.12") == Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")
    # a ReplicaSet without an owner is its own workload
    rs = load_objects("replicasets")[0]
    rs["metadata"]["ownerReferences"] = []
    state.apply("replicasets", "MODIFIED", rs)
    assert r.peer("10.244.1.12").owner_kind == "ReplicaSet"


PEER_TABLE = [
    ("10.244.1.12", Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")),  # pod on this node
    ("fd00:10:244:1::c", Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")),  # its IPv6
    ("::ffff:10.244.1.14", Workload("shop", "db-0", "StatefulSet", "db")),                        # v4-mapped
    ("10.244.2.21", Workload("shop", "api-5f8d7b9c4-mn4lp", "Deployment", "api")),                # other node, via EndpointSlice
    ("10.96.20.5", service("shop", "api")),                                                       # ClusterIP
    ("fd00:96::14", service("shop", "api")),                                                      # second ClusterIP
    ("10.96.0.1", service("default", "kubernetes")),
    ("192.168.10.11", external("192.168.10.11")),          # node IP: hostNetwork pods do not claim it
    ("10.1.2.3", external("10.1.2.3", "corp")),
    ("10.20.3.4", external("10.20.3.4", "corp-lab")),      # longest prefix wins
    ("2001:db8::7", external("2001:db8::7", "doc6")),
    ("93.184.216.34", external("93.184.216.34")),
    ("", UNKNOWN),
]


@pytest.mark.parametrize("address,expected", PEER_TABLE, ids=[row[0] or "empty" for row in PEER_TABLE])
def test_peer(resolver: IdentityResolver, address: str, expected: Workload) -> None:
    assert resolver.peer(address) == expected


def test_endpoint_of_unknown_controller_is_named_by_its_service(resolver: IdentityResolver) -> None:
    eps = load_objects("endpointslices")[0]
    eps["endpoints"].append({"addresses": ["10.244.3.9"], "conditions": {"ready": True},
                             "targetRef": {"kind": "Pod", "namespace": "shop", "name": "legacy-x1"}})
    resolver.state.apply("endpointslices", "MODIFIED", eps)
    assert resolver.peer("10.244.3.9") == Workload("shop", "legacy-x1", "Service", "api")


def test_deleted_pod_keeps_its_name_until_ttl_then_expires(resolver: IdentityResolver, tree: CgroupTree,
                                                           clock: Clock) -> None:
    pod = "api-5f8d7b9c4-qwz7t"
    cgroup_id = tree.make(kubelet_cgroup_relpath(UIDS[pod], CID, "burstable"))
    w = resolver.local(cgroup_id, 0, "api")
    assert not resolver.expired(w)
    obj = next(o for o in load_objects("pods") if o["metadata"]["name"] == pod)
    resolver.state.apply("pods", "DELETED", obj)
    clock.t += 299
    assert resolver.local(cgroup_id, 0, "api") == w          # draining flows keep their names
    assert resolver.peer("10.244.1.13") == w
    assert not resolver.expired(w)
    clock.t += 2
    assert resolver.expired(w) and resolver.local(cgroup_id, 0, "api") == w
    assert not resolver.expired(Workload("", "", "process", "api"))
    assert not resolver.expired(external("1.2.3.4"))


def test_pod_missing_from_a_relist_is_a_deletion(resolver: IdentityResolver, clock: Clock) -> None:
    pods = [o for o in node1(load_objects("pods")) if o["metadata"]["name"] != "debug"]
    resolver.state.replace("pods", pods)
    w = resolver.peer("10.244.1.17")
    assert w == Workload("shop", "debug", "Pod", "debug")
    clock.t += 301
    assert resolver.expired(w)


def test_recreated_pod_of_the_same_name_is_not_expired_and_owns_a_reused_ip(resolver: IdentityResolver,
                                                                           clock: Clock) -> None:
    old = next(o for o in load_objects("pods") if o["metadata"]["name"] == "db-0")
    resolver.state.apply("pods", "DELETED", old)
    # an unrelated new pod takes the old IP; db-0 comes back with another IP and UID
    resolver.state.apply("pods", "ADDED", pod_object("cache-1", "shop", "44444444-2222-4333-8444-555555555555",
                                                     "10.244.1.14"))
    new = pod_object("db-0", "shop", "55555555-2222-4333-8444-555555555555", "10.244.1.99",
                     owner=old["metadata"]["ownerReferences"][0])
    resolver.state.apply("pods", "ADDED", new)
    clock.t += 1000
    assert resolver.peer("10.244.1.14") == Workload("shop", "cache-1", "Pod", "cache-1")
    db = resolver.peer("10.244.1.99")
    assert db == Workload("shop", "db-0", "StatefulSet", "db") and not resolver.expired(db)


def test_a_finished_pod_does_not_keep_its_reused_ip(resolver: IdentityResolver) -> None:
    new = pod_object("cache-1", "shop", "44444444-2222-4333-8444-555555555555", "10.244.1.15")
    resolver.state.apply("pods", "ADDED", new)
    done = next(o for o in load_objects("pods") if o["metadata"]["name"] == "report-28745100-h7x2z")
    done["status"]["phase"] = "Succeeded"          # still lists podIP 10.244.1.15
    resolver.state.apply("pods", "MODIFIED", done)
    assert resolver.peer("10.244.1.15").pod == "cache-1"


def test_deleted_service_expires(resolver: IdentityResolver, clock: Clock) -> None:
    svc = next(o for o in load_objects("services") if o["metadata"]["name"] == "frontend")
    resolver.state.apply("services", "DELETED", svc)
    w = resolver.peer("10.96.12.10")
    assert w == service("shop", "frontend") and not resolver.expired(w)
    clock.t += 301
    assert resolver.expired(w)


def test_tombstones_are_dropped_long_after_expiry(clock: Clock) -> None:
    state = ClusterState(clock=clock, keep_s=3600)
    state.replace("pods", node1(load_objects("pods")))
    state.replace("pods", [])
    assert state.pod_by_ip("10.244.1.12") is not None
    clock.t += 3601
    state.apply("services", "ADDED", load_objects("services")[0])   # any change prunes
    assert state.pod_by_ip("10.244.1.12") is None


def test_owner_chain_follows_live_changes(resolver: IdentityResolver) -> None:
    job = load_objects("jobs")[1]       # migrate: no CronJob
    job["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly",
                                           "uid": "x", "controller": True}]
    resolver.state.apply("jobs", "MODIFIED", job)
    assert resolver.peer("10.244.1.16") == Workload("shop", "migrate-5tq8w", "CronJob", "nightly")


# -- netns fallback


def fake_proc(root: Path, pid: int, netns: int, cgroup: str, v4: List[str], v6: List[str]) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "net").mkdir()
    os.symlink(f"net:[{netns}]", d / "ns" / "net")
    (d / "cgroup").write_text(f"0::/{cgroup}\n")
    trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n"
    for a in ["127.0.0.1"] + v4:
        trie += f"     +-- {a}/31 1 0 0\n        |-- {a}\n           /32 host LOCAL\n"
    (d / "net" / "fib_trie").write_text(trie)
    (d / "net" / "if_inet6").write_text("".join(
        f"{ipaddress.IPv6Address(a).exploded.replace(':', '')} 02 40 00 80     eth0\n"
        for a in v6 + ["::1", "fe80::1"]))


def test_local_falls_back_to_the_netns(clock: Clock, tree: CgroupTree, tmp_path: Path) -> None:
    tree.root.mkdir()
    proc = tmp_path / "proc"
    # a process of the db pod in netns 4026532001 whose socket cgroup is unknown to us
    fake_proc(proc, 4242, 4026532001, kubelet_cgroup_relpath(UIDS["db-0"], CID, "guaranteed", "cgroupfs"), [], [])
    # a process in a netns with the frontend's address but a non-kubelet cgroup
    fake_proc(proc, 4343, 4026532002, "system.slice/foo.service", ["10.244.1.12"], ["fd00:10:244:1::c"])
    netns = NetnsLocator(proc=str(proc), named_dirs=(), clock=clock)
    r = IdentityResolver(loaded_state(clock), CgroupResolver(root=str(tree.root)), netns=netns)
    assert r.local(0, 4026532001, "postgres") == Workload("shop", "db-0", "StatefulSet", "db")
    assert r.local(0, 4026532002, "nginx") == Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")
    assert r.local(0, 4026532003, "x") == Workload("", "", "process", "x")
    scans = netns.scans
    r.local(0, 4026532003, "x")                                  # negative cache: no new scan
    assert netns.scans == scans


def test_proc_net_parsers() -> None:
    trie = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.244.1.0/24 2 0 2
        +-- 10.244.1.0/28 2 0 2
           |-- 10.244.1.0
              /24 link UNICAST
           |-- 10.244.1.12
              /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.244.1.0/28 2 0 2
        |-- 10.244.1.12
           /32 host LOCAL
"""
    assert parse_fib_trie_local(trie) == ["10.244.1.12"]
    inet6 = ("fd00001002440001000000000000000c 02 40 00 80     eth0\n"
             "fe80000000000000e85d68fffeaf5042 03 40 20 80     eth0\n"
             "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert parse_if_inet6(inet6) == ["fd00:10:244:1::c"]


# -- helpers and the protocol


def test_cidr_names_and_address_normalization() -> None:
    assert parse_cidr_names("10.0.0.0/8=corp, 192.168.0.0/16=office") == {"10.0.0.0/8": "corp",
                                                                         "192.168.0.0/16": "office"}
    for bad in ("10.0.0.0/8", "nonsense=x", "10.0.0.0/8="):
        with pytest.raises(ValueError):
            parse_cidr_names(bad)
    names = CidrNames({"0.0.0.0/0": "internet", "10.0.0.0/8": "corp"})
    assert names.name("10.9.9.9") == "corp" and names.name("8.8.8.8") == "internet" and names.name("::1") is None
    assert normalize_address("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalize_address("FD00::0001") == "fd00::1"
    assert normalize_address("not-an-ip") == "not-an-ip"


def test_both_views_satisfy_the_protocol(resolver: IdentityResolver) -> None:
    views: List[IdentityView] = [resolver, StandaloneIdentity()]
    for view in views:
        assert isinstance(view.local(0, 0, "p"), Workload) and isinstance(view.peer("1.2.3.4"), Workload)


# -- end to end: the watcher feeds the state


def test_resolver_fed_by_the_watcher_survives_an_outage(tree: CgroupTree, clock: Clock) -> None:
    tree.root.mkdir()
    objects = [o for name in FIXTURES.values() for o in load_objects(name)]
    with FakeApiServer(objects) as srv:
        state = ClusterState(clock=clock)
        watcher = KubeWatcher(api_client(host=srv.url), state,
                              WatchConfig(node_name="node-1", backoff=Backoff(0.02, 0.1)))
        r = IdentityResolver(state, CgroupResolver(root=str(tree.root)))
        watcher.start()
        try:
            assert watcher.wait_synced(5)
            assert watcher.status()["pods"].objects == 8
            assert r.peer("10.244.2.21") == Workload("shop", "api-5f8d7b9c4-mn4lp", "Deployment", "api")
            uid = "66666666-2222-4333-8444-555555555555"
            cgroup_id = tree.make(kubelet_cgroup_relpath(uid, CID))
            srv.add(pod_object("late-1", "shop", uid, "10.244.1.50"))
            _wait(lambda: r.local(cgroup_id, 0, "x").pod == "late-1")
            srv.go_down()
            _wait(lambda: not watcher.status()["pods"].up)
            assert r.local(cgroup_id, 0, "x") == Workload("shop", "late-1", "Pod", "late-1")   # names kept
            assert r.peer("10.96.20.5") == service("shop", "api")
            srv.come_up()
            srv.delete("Pod", "shop", "late-1")
            _wait(lambda: state.pod_deleted_for("shop", "late-1") is not None)
            clock.t += 301
            assert r.expired(r.local(cgroup_id, 0, "x"))
        finally:
            watcher.stop()
            watcher.api.close()


def _wait(cond, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
