"""kubelet cgroup naming: a table of paths as real nodes show them (systemd and cgroupfs
drivers; containerd, CRI-O, Docker; kind/k3s nesting; static pods), plus what is not a pod."""
from __future__ import annotations

from typing import Optional

import pytest

from meshlens.agent.identity.kubelet_cgroups import ContainerCgroup, parse_cgroup_path
from tests.integration.pods import kubelet_cgroup_relpath

UID = "7f3c2a1e-5b6d-4c8e-9f01-23456789abcd"
UID_ = UID.replace("-", "_")
CID = "3e1f0c9a" * 8
STATIC = "6e1c5c5bbf9e2bd8d0b3c5df3b6a0f2a"

C = ContainerCgroup
TABLE = [
    # systemd driver, containerd (GKE, EKS AL2023, kubeadm defaults)
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     C(UID, CID, "besteffort", "containerd", "systemd")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     C(UID, CID, "burstable", "containerd", "systemd")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
     C(UID, CID, "guaranteed", "containerd", "systemd")),
    # systemd driver, CRI-O (OpenShift): the container, its conmon, crun's nested sub-cgroup
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
     C(UID, CID, "burstable", "cri-o", "systemd")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     C(UID, CID, "burstable", "cri-o", "systemd", conmon=True)),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container",
     C(UID, CID, "guaranteed", "cri-o", "systemd")),
    # systemd driver, Docker through cri-dockerd
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope",
     C(UID, CID, "besteffort", "docker", "systemd")),
    # kind: kubelet inside a container, its own slice as prefix
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     C(UID, CID, "besteffort", "containerd", "systemd")),
    # static pod (kube-apiserver): config hash instead of a UUID
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope",
     C(STATIC, CID, "burstable", "containerd", "systemd")),
    # pod-level cgroup (no container component)
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
     C(UID, "", "besteffort", "", "systemd")),
    # cgroupfs driver: containerd and Docker use the bare id, CRI-O prefixes it
    (f"/kubepods/besteffort/pod{UID}/{CID}", C(UID, CID, "besteffort", "", "cgroupfs")),
    (f"/kubepods/burstable/pod{UID}/{CID}", C(UID, CID, "burstable", "", "cgroupfs")),
    (f"/kubepods/pod{UID}/{CID}", C(UID, CID, "guaranteed", "", "cgroupfs")),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", C(UID, CID, "burstable", "cri-o", "cgroupfs")),
    (f"/kubepods/burstable/pod{UID}", C(UID, "", "burstable", "", "cgroupfs")),
    # k3s in Docker (k3d): the node container's cgroup as prefix; relative path as well
    (f"/docker/{'ab' * 32}/kubepods/besteffort/pod{UID}/{CID}", C(UID, CID, "besteffort", "", "cgroupfs")),
    (f"kubepods/besteffort/pod{UID}/{CID}", C(UID, CID, "besteffort", "", "cgroupfs")),
    # containers outside Kubernetes
    (f"/system.slice/docker-{CID}.scope", C("", CID, "", "docker", "")),
    (f"/docker/{CID}", C("", CID, "", "docker", "")),
    (f"/machine.slice/libpod-{CID}.scope", C("", CID, "", "podman", "")),
    (f"/machine.slice/libpod-{CID}.scope/container", C("", CID, "", "podman", "")),
    # not a container
    ("/", None),
    ("", None),
    ("/user.slice/user-1000.slice/session-3.scope", None),
    ("/system.slice/containerd.service", None),
    ("/system.slice/kubelet.service", None),
    ("/kubepods.slice", None),
    ("/kubepods.slice/kubepods-besteffort.slice", None),
    (f"/user.slice/pod{UID}/{CID}", None),          # a "pod" dir outside kubepods is not kubelet's
    (f"/somewhere/{CID}", None),                     # a bare id outside /docker is not a container
    (f"/kubepods/besteffort/pod{UID[:-1]}/{CID}", None),  # truncated UID
]


@pytest.mark.parametrize("path,expected", TABLE, ids=[str(i) for i in range(len(TABLE))])
def test_table(path: str, expected: Optional[ContainerCgroup]) -> None:
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
@pytest.mark.parametrize("runtime", ["containerd", "cri-o", "docker"])
@pytest.mark.parametrize("qos", ["guaranteed", "burstable", "besteffort"])
def test_round_trip_with_the_test_pods_naming(driver: str, runtime: str, qos: str) -> None:
    """The integration tests' Pod cgroups (tests/integration/pods.py) parse back to what made them."""
    got = parse_cgroup_path(kubelet_cgroup_relpath(UID, CID, qos, driver, runtime))
    assert got is not None
    assert (got.pod_uid, got.container_id, got.qos, got.driver) == (UID, CID, qos, driver)
    if driver == "systemd":
        assert got.runtime == runtime
