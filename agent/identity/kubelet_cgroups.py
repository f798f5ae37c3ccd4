"""cgroup v2 path -> pod UID, container id, QoS class, runtime and cgroup driver.

Second step of naming the local side of a flow: the kernel gives a socket's cgroup id,
agent/identity/cgroups.py turns it into a path, this module reads the kubelet's naming out of that
path, and agent/identity/resolver.py looks the pod UID up in the Kubernetes watch.

Naming handled (every component may sit under a prefix such as a kind/k3s node's own
cgroup, e.g. /kubelet.slice/kubelet-kubepods.slice/... or /docker/<id>/kubepods/...):

systemd driver  kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid_with_underscores>.slice/<scope>
                scope: cri-containerd-<id>.scope (containerd), crio-<id>.scope and
                crio-conmon-<id>.scope (CRI-O), docker-<id>.scope (Docker / cri-dockerd)
cgroupfs driver kubepods/[<qos>/]pod<uid>/<id>     (containerd, Docker: bare id, runtime unknown)
                kubepods/[<qos>/]pod<uid>/crio-<id> (CRI-O)

Static pods are named by their config hash (32 hex digits, no dashes) instead of a UUID.
Anything below the container component (crun's "container" sub-cgroup, say) is ignored.
A pod-level path without a container component gives the pod UID and an empty container id.
Containers outside Kubernetes (system.slice/docker-<id>.scope, machine.slice/libpod-<id>.scope,
cgroupfs /docker/<id>) give a container id and runtime with an empty pod UID.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

QOS_GUARANTEED = "guaranteed"
QOS_BURSTABLE = "burstable"
QOS_BESTEFFORT = "besteffort"

_UID = r"[0-9a-fA-F]{8}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{12}"
_ID = r"[0-9a-f]{64}"
_POD_SYSTEMD = re.compile(rf"^(?:[\w-]+-)?pod({_UID})\.slice$")
_POD_CGROUPFS = re.compile(rf"^pod({_UID})$")
_QOS_SYSTEMD = re.compile(r"^(?:[\w-]+-)?kubepods-(burstable|besteffort)\.slice$")
_KUBEPODS = re.compile(r"^(?:[\w-]+-)?kubepods(?:\.slice)?$")

# (pattern, runtime, is a runtime helper process rather than the container itself)
_CONTAINER_PATTERNS: Tuple[Tuple[re.Pattern, str, bool], ...] = (
    (re.compile(rf"^cri-containerd-({_ID})\.scope$"), "containerd", False),
    (re.compile(rf"^crio-conmon-({_ID})\.scope$"), "cri-o", True),
    (re.compile(rf"^crio-({_ID})(?:\.scope)?$"), "cri-o", False),
    (re.compile(rf"^docker-({_ID})\.scope$"), "docker", False),
    (re.compile(rf"^libpod-conmon-({_ID})\.scope$"), "podman", True),
    (re.compile(rf"^libpod-({_ID})\.scope$"), "podman", False),
    (re.compile(rf"^({_ID})$"), "", False),
)


@dataclass(frozen=True)
class ContainerCgroup:
    """What a cgroup path says about the container and pod it belongs to."""

    pod_uid: str          # "" outside a kubepods hierarchy; dashed UUID or static-pod hash
    container_id: str     # 64 hex digits, "" for a pod-level cgroup
    qos: str              # guaranteed | burstable | besteffort, "" outside kubepods
    runtime: str          # containerd | cri-o | docker | podman | "" (cgroupfs bare id: unknown)
    driver: str           # systemd | cgroupfs | "" when no kubelet naming was found
    conmon: bool = False  # the runtime's monitor process (CRI-O/podman conmon), not the container


def _normalize_uid(raw: str) -> str:
    """kubelet's systemd naming turns the UID's dashes into underscores; undo that."""
    uid = raw.replace("_", "-").lower()
    return uid


def _container(part: str) -> Optional[Tuple[str, str, bool]]:
    for pattern, runtime, conmon in _CONTAINER_PATTERNS:
        m = pattern.match(part)
        if m:
            return m.group(1), runtime, conmon
    return None


def parse_cgroup_path(path: str) -> Optional[ContainerCgroup]:
    """Parse a cgroup v2 path (relative to the mount or absolute); None if it names no container or pod."""
    parts: List[str] = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        m = _POD_SYSTEMD.match(part)
        driver = "systemd"
        if m is None:
            m = _POD_CGROUPFS.match(part)
            driver = "cgroupfs"
        if m is None or not any(_KUBEPODS.match(p) for p in parts[:i]):
            continue
        qos = QOS_GUARANTEED
        for p in parts[:i]:
            q = _QOS_SYSTEMD.match(p)
            if q or p in (QOS_BURSTABLE, QOS_BESTEFFORT):
                qos = q.group(1) if q else p
        found = _container(parts[i + 1]) if i + 1 < len(parts) else None
        container_id, runtime, conmon = found or ("", "", False)
        return ContainerCgroup(_normalize_uid(m.group(1)), container_id, qos, runtime, driver, conmon)
    # outside Kubernetes: the deepest component that names a container
    for part in reversed(parts):
        found = _container(part)
        if found and (found[1] or _is_docker_cgroupfs(parts, part)):
            container_id, runtime, conmon = found
            return ContainerCgroup("", container_id, "", runtime or "docker", "", conmon)
    return None


def _is_docker_cgroupfs(parts: List[str], part: str) -> bool:
    """A bare id outside kubepods counts only as Docker's cgroupfs layout: /docker/<id>."""
    i = parts.index(part)
    return i > 0 and parts[i - 1] == "docker"
