"""Identity on the real kernel: netns pods with kubelet-style cgroups (both cgroup drivers,
containerd / CRI-O / Docker naming) and a fake API server serving their Pod objects (same
UID and pod IPs) to the real watcher. The resolver names each pod from its cgroup id, from
its netns alone (through a process in it, or through its interface addresses), and as a
peer from its IPv4 and IPv6 addresses."""
from __future__ import annotations

import subprocess
import time
import uuid
from typing import Iterator, List, Tuple

import pytest

from meshlens.agent.identity.cgroups import CgroupResolver
from meshlens.agent.identity.resolver import IdentityResolver
from meshlens.agent.identity.model import Workload
from meshlens.agent.identity.k8s_state import ClusterState
from meshlens.agent.identity.k8s_watch import Backoff, KubeWatcher, WatchConfig, api_client
from meshlens.agent.identity.netns import NetnsLocator
from tests.integration.pods import Node, Pod
from tests.unit.fake_apiserver import FakeApiServer, load_objects, owner_ref, pod_object

NODE_NAME = "node-1"

# (pod name, cgroup driver, runtime, qos, ownerReference of the Pod, expected owner)
PODS = [
    ("frontend-7d4b9c6f5d-x2kq9", "systemd", "containerd", "besteffort",
     owner_ref("ReplicaSet", "frontend-7d4b9c6f5d"), ("Deployment", "frontend")),
    ("db-0", "cgroupfs", "cri-o", "guaranteed", owner_ref("StatefulSet", "db"), ("StatefulSet", "db")),
    ("report-28745100-h7x2z", "systemd", "docker", "burstable",
     owner_ref("Job", "report-28745100", api_version="batch/v1"), ("CronJob", "report")),
    ("debug", "cgroupfs", "containerd", "besteffort", None, ("Pod", "debug")),
]


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def cluster(node: Node) -> Iterator[Tuple[List[Tuple[Pod, Workload]], IdentityResolver, FakeApiServer]]:
    pods: List[Tuple[Pod, Workload]] = []
    objects = load_objects("replicasets") + load_objects("jobs")     # the owner chain's upper links
    for name, driver, runtime, qos, owner, (kind, owner_name) in PODS:
        pod = node.add_pod(name, "shop", uid=str(uuid.uuid4()), qos=qos, cgroup_driver=driver, runtime=runtime)
        objects.append(pod_object(name, "shop", pod.uid, pod.ipv4, node=NODE_NAME, ipv6=pod.ipv6, owner=owner,
                                  container_id=pod.container_id, runtime=runtime))
        pods.append((pod, Workload("shop", name, kind, owner_name)))
    with FakeApiServer(objects) as server:
        state = ClusterState()
        watcher = KubeWatcher(api_client(host=server.url), state,
                              WatchConfig(node_name=NODE_NAME, backoff=Backoff(0.02, 0.1)))
        watcher.start()
        try:
            assert watcher.wait_synced(10)
            yield pods, IdentityResolver(state, CgroupResolver(), netns=NetnsLocator()), server
        finally:
            watcher.stop()
            watcher.api.close()


def test_local_and_peer_name_each_pod(cluster) -> None:
    pods, resolver, _ = cluster
    drivers = {(p.cgroup_driver, p.runtime) for p, _ in pods}
    assert {"systemd", "cgroupfs"} <= {d for d, _ in drivers} and len({r for _, r in drivers}) >= 2
    for pod, expected in pods:
        assert resolver.local(pod.cgroup_id, pod.netns_inode, "x") == expected, pod
        assert resolver.container(pod.cgroup_id).container_id == pod.container_id
        assert resolver.peer(pod.ipv4) == expected
        assert resolver.peer(pod.ipv6) == expected
        assert resolver.peer("::ffff:" + pod.ipv4) == expected


def test_netns_alone_names_the_pod(cluster) -> None:
    """No usable cgroup id: a process in the netns gives the pod's cgroup; with no process,
    the addresses of the netns's interfaces are the pod's IPs."""
    pods, resolver, _ = cluster
    (with_process, expected_p), (empty, expected_e) = pods[0], pods[1]
    proc = with_process.popen(["sleep", "30"], stdout=subprocess.DEVNULL)
    try:
        assert resolver.local(0, with_process.netns_inode, "sleep") == expected_p
    finally:
        proc.kill()
        proc.wait()
    assert resolver.local(0, empty.netns_inode, "x") == expected_e
    assert resolver.local(0, 0, "x") == Workload("", "", "process", "x")


def test_deleted_pod_keeps_names_then_expires(cluster) -> None:
    pods, resolver, server = cluster
    pod, expected = pods[3]
    server.delete("Pod", "shop", pod.name)
    _wait(lambda: resolver.state.pod_deleted_for("shop", pod.name) is not None)
    got = resolver.local(pod.cgroup_id, pod.netns_inode, "x")
    assert got == expected and not resolver.expired(got)
    resolver.ttl_s = 0.0
    time.sleep(0.01)
    assert resolver.expired(got)
