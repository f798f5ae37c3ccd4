"""Runs the DaemonSet's pod template from daemonset/ with podman, for the container tests.

`podman kube play` (4.3, Debian 12) drops `hostPID` and `securityContext.seccompProfile`
and refuses `ports` together with hostNetwork, so the pod template is translated to
`podman run` flags instead, mechanically: every field of the container and pod spec is
either translated or in an explicit list of fields without effect on one node (probes,
tolerations, ...); an unknown field fails the translation, so the manifest cannot gain a
setting the test silently ignores. Overrides (listen address, state dir, Kubernetes off:
there is no API server here) replace values of flags the manifest already has.
"""
from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "daemonset" / "daemonset.yaml"
CONTAINER_PREFIX = "meshlens-test-"

# Fields that have no effect on a single node without a kubelet/scheduler, or that the test
# exercises itself (probes: polled over HTTP; terminationGracePeriodSeconds: `podman stop -t`).
POD_FIELDS_NOT_TRANSLATED = {"serviceAccountName", "priorityClassName", "tolerations", "dnsPolicy",
                             "terminationGracePeriodSeconds", "initContainers", "containers", "volumes",
                             "hostNetwork", "hostPID"}
CONTAINER_FIELDS_NOT_TRANSLATED = {"name", "image", "imagePullPolicy", "ports", "livenessProbe",
                                   "readinessProbe", "command", "args", "env", "securityContext",
                                   "volumeMounts", "resources"}


def load_daemonset(path: Path = DAEMONSET) -> Dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pod_spec(ds: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return copy.deepcopy((ds or load_daemonset())["spec"]["template"]["spec"])


def container_of(spec: Dict[str, Any], name: str) -> Dict[str, Any]:
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(f"no container {name!r} in the pod template")


def replace_flag(args: List[str], flag: str, value: str) -> List[str]:
    """args with the value of an existing `flag` replaced (`--flag value` or `--flag=value`)."""
    out = list(args)
    for i, a in enumerate(out):
        if a == flag:
            out[i + 1] = value
            return out
        if a.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
    raise KeyError(f"{flag} is not among the manifest's args {args}")


def _memory_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for u, m in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * m)
    return int(q)


def podman_run_args(spec: Dict[str, Any], container: Dict[str, Any], name: str,
                    host_paths: Optional[Dict[str, str]] = None) -> List[str]:
    """`podman run` argv for one container of the pod spec. host_paths maps a volume name to
    a host directory that replaces its hostPath (the test's own state dir)."""
    unknown = set(spec) - POD_FIELDS_NOT_TRANSLATED
    unknown |= {f"{container['name']}.{k}" for k in set(container) - CONTAINER_FIELDS_NOT_TRANSLATED}
    if unknown:
        raise ValueError(f"pod template fields the translation does not know: {sorted(unknown)}")
    argv = ["podman", "run", "-d", "--name", name, "--read-only-tmpfs=false"]
    if spec.get("hostNetwork"):
        argv.append("--network=host")
    if spec.get("hostPID"):
        argv.append("--pid=host")
    argv += _security_flags(container.get("securityContext", {}))
    argv += _volume_flags(spec.get("volumes", []), container.get("volumeMounts", []), host_paths or {})
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        argv.append(f"--memory={_memory_bytes(limits['memory'])}")
    if "cpu" in limits:
        argv.append(f"--cpus={limits['cpu']}")
    for env in container.get("env", []):
        if "value" in env:
            argv += ["--env", f"{env['name']}={env['value']}"]
        elif env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            argv += ["--env", f"{env['name']}={socket.gethostname()}"]  # what the kubelet fills in
        else:
            raise ValueError(f"env {env['name']}: only value and fieldRef spec.nodeName are translated")
    command = container.get("command")
    if command:
        argv += ["--entrypoint", json.dumps(command)]
    argv.append(container["image"])
    argv += container.get("args", [])
    return argv


def _security_flags(sc: Dict[str, Any]) -> List[str]:
    known = {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsUser", "runAsGroup",
             "capabilities", "seccompProfile"}
    if set(sc) - known:
        raise ValueError(f"securityContext fields not translated: {sorted(set(sc) - known)}")
    out: List[str] = []
    if sc.get("privileged"):
        out.append("--privileged")
    if sc.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        out.append("--read-only")
    if "runAsUser" in sc:
        out += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', 0)}"]
    caps = sc.get("capabilities", {})
    out += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
    if caps.get("add"):
        out.append("--cap-add=" + ",".join(caps["add"]))
    profile = sc.get("seccompProfile", {"type": "RuntimeDefault"})
    if profile["type"] == "Unconfined":
        out += ["--security-opt", "seccomp=unconfined"]
    elif profile["type"] == "Localhost":
        out += ["--security-opt", f"seccomp={profile['localhostProfile']}"]
    elif profile["type"] != "RuntimeDefault":
        raise ValueError(f"seccompProfile type {profile['type']!r}")
    return out


def _volume_flags(volumes: Iterable[Dict[str, Any]], mounts: Iterable[Dict[str, Any]],
                  host_paths: Dict[str, str]) -> List[str]:
    by_name = {v["name"]: v for v in volumes}
    out: List[str] = []
    for m in mounts:
        vol = by_name[m["name"]]
        if "hostPath" in vol:
            src = host_paths.get(m["name"], vol["hostPath"]["path"])
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                Path(src).mkdir(parents=True, exist_ok=True)
            opts = ["ro" if m.get("readOnly") else "rw"]
            prop = m.get("mountPropagation", "None")
            opts.append({"None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}[prop])
            out += ["--volume", f"{src}:{m['mountPath']}:{','.join(opts)}"]
        elif "emptyDir" in vol:
            size = vol["emptyDir"].get("sizeLimit")
            out += ["--tmpfs", f"{m['mountPath']}:rw" + (f",size={_memory_bytes(size)}" if size else "")]
        else:
            raise ValueError(f"volume {vol['name']}: only hostPath and emptyDir are translated")
    return out


@dataclass
class Container:
    """One container of the pod template, run with podman; `stop()` always removes it."""

    argv: List[str]
    name: str
    state_dir: str
    started: bool = False
    log_text: str = ""
    exit_code: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def start(self) -> "Container":
        r = subprocess.run(self.argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"podman run failed ({r.returncode}): {r.stderr.strip()}\nargv: {self.argv}")
        self.started = True
        return self

    def inspect(self, fmt: str) -> str:
        return subprocess.run(["podman", "inspect", "--format", fmt, self.name], capture_output=True,
                              text=True, check=True).stdout.strip()

    def pid(self) -> int:
        return int(self.inspect("{{.State.Pid}}"))

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        r = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
        return r.stdout + r.stderr

    def wait(self, timeout: float) -> int:
        r = subprocess.run(["podman", "wait", self.name], capture_output=True, text=True, timeout=timeout)
        return int(r.stdout.strip().splitlines()[-1])

    def stop(self, grace_s: int = 30) -> Optional[int]:
        """SIGTERM, up to grace_s for the agent to detach, then remove. Returns the exit code."""
        if self.started:
            subprocess.run(["podman", "stop", "-t", str(grace_s), self.name], capture_output=True, timeout=grace_s + 30)
            try:
                self.exit_code = int(self.inspect("{{.State.ExitCode}}"))
            except (subprocess.CalledProcessError, ValueError):
                self.exit_code = None
            self.log_text = self.logs()
            subprocess.run(["podman", "rm", "-f", self.name], capture_output=True, timeout=60)
            self.started = False
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.exit_code


def make_container(spec: Dict[str, Any], container_name: str, args: Optional[List[str]] = None) -> Container:
    """A Container for `container_name` of `spec` (not started), with its own state dir."""
    c = copy.deepcopy(container_of(spec, container_name))
    if args is not None:
        c["args"] = args
    state = tempfile.mkdtemp(prefix="meshlens-ctr-")
    name = f"{CONTAINER_PREFIX}{container_name}-{Path(state).name[-8:].lower()}"
    return Container(podman_run_args(spec, c, name, host_paths={"state": state}), name, state)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def wait_ready(container: Container, base: str, paths: List[str], timeout: float = 60.0) -> str:
    """Poll the first path that the agent serves (readiness path, else /metrics); returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not container.running():
            raise RuntimeError(f"container exited:\n{container.logs()[-4000:]}")
        for p in paths:
            try:
                code, _ = http_get(base + p, timeout=2)
            except OSError:
                break
            if code == 200:
                return p
        time.sleep(0.3)
    raise TimeoutError(f"agent in container not ready in {timeout}s:\n{container.logs()[-4000:]}")


def leftover_containers() -> List[str]:
    r = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True)
    return [n for n in r.stdout.split() if n.startswith(CONTAINER_PREFIX)]


def podman_usable() -> Optional[str]:
    """None if podman can run containers here, else the reason it cannot."""
    if shutil.which("podman") is None:
        return "podman is not installed (make deps installs it)"
    r = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"podman cannot run containers here: {r.stderr.strip()[:300]}"
    return None
