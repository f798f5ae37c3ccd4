"""The DaemonSet's pod template, run for real: the image from `make image`, run by podman
with exactly the manifest's capabilities, mounts, namespaces and seccomp profile
(tests/integration/container.py translates the template). `meshlens check` passes inside;
traffic between two netns pods is counted exactly through the container's /metrics;
stopping the container detaches everything; each listed capability is needed, and the
runtime's default seccomp profile is not enough (podman's, from containers/common)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.agent_proc import loaded_programs
from tests.integration.container import (REPO, Container, container_of, http_get, leftover_containers,
                                         load_daemonset, make_container, pod_spec, podman_usable,
                                         replace_flag, wait_ready)
from tests.integration.servers import free_port
from tests.integration.test_tcp_l4 import finish, of, run_json, start_listener

AGENT, CHECK = "agent", "check"


@pytest.fixture(scope="module")
def image() -> str:
    """The image the manifest names, (re)built by `make image` (seconds when nothing changed)."""
    reason = podman_usable()
    if reason:
        pytest.skip(reason)
    name = container_of(pod_spec(), AGENT)["image"]
    t0 = time.monotonic()
    r = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "image", f"IMAGE={name}"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"make image failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", name],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(f"\nmake image: {time.monotonic() - t0:.1f} s, {name} is {int(size) / 1e6:.0f} MB")
    yield name
    left = leftover_containers()
    for n in left:
        subprocess.run(["podman", "rm", "-f", n], capture_output=True)
    assert not left, f"containers left behind (now removed): {left}"


def run_check(spec: Dict, timeout: float = 120, args: List[str] = None) -> tuple[int, str]:
    """Run the init container (`meshlens check`) of `spec`; its exit code and output."""
    ctr = make_container(spec, CHECK, args=args)
    try:
        ctr.start()
        code = ctr.wait(timeout)
        return code, ctr.logs()
    finally:
        ctr.stop(grace_s=1)


def listed_caps() -> List[str]:
    return container_of(pod_spec(), AGENT)["securityContext"]["capabilities"]["add"]


def with_caps(caps: List[str]) -> Dict:
    spec = pod_spec()
    for c in spec["initContainers"] + spec["containers"]:
        c["securityContext"]["capabilities"]["add"] = list(caps)
    return spec


def test_check_passes_in_container(image: str) -> None:
    code, out = run_check(pod_spec())
    assert code == 0, out
    assert "Status check results are √" in out
    for cap in listed_caps():
        assert f"√ CAP_{cap} held" in out
    assert "√ the node's processes are visible in /proc" in out  # hostPID honoured
    # L7 with the manifest's mounts: tc on pod veths, cgroup_skb on the node's cgroup v2 root
    # (the hostPath /sys/fs/cgroup, not the container's own), no syscall tracepoint
    assert "√ http/l7_pod_traffic: packets (tc on pod veths)" in out, out
    assert "√ http/l7_other_traffic: cgroup_skb (cgroup v2 root" in out, out


@pytest.mark.parametrize("cap", listed_caps())
def test_each_listed_capability_is_needed(image: str, cap: str) -> None:
    code, out = run_check(with_caps([c for c in listed_caps() if c != cap]))
    assert code != 0, out
    assert f"× CAP_{cap} held" in out, out
    assert f"hint: CAP_{cap} is missing" in out
    assert "Status check results are ×" in out


def test_saturation_feature_needs_sys_admin(image: str) -> None:
    """Why `sat` is off in the manifest: its socket walk enters every pod's netns (setns),
    which needs CAP_SYS_ADMIN; check names it, and passes once it is added."""
    code, out = run_check(pod_spec(), args=["--features", "l4,l7,tc,sat"])
    assert code != 0 and "× CAP_SYS_ADMIN held" in out, out
    code, out = run_check(with_caps(listed_caps() + ["SYS_ADMIN"]), args=["--features", "l4,l7,tc,sat"])
    assert code == 0, out


def test_default_seccomp_profile_blocks_bpf(image: str) -> None:
    """Why the manifest says Unconfined: podman's default profile (containers/common, as
    CRI-O's) allows bpf() only with CAP_SYS_ADMIN, so every program load fails with EPERM."""
    spec = pod_spec()
    check = container_of(spec, CHECK)
    assert check["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    check["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    code, out = run_check(spec)
    assert code != 0
    assert "√ CAP_BPF held" in out                                     # the capability is there,
    assert "tcp: cannot load" in out and "Operation not permitted" in out  # seccomp refuses the call


def _samples(text: str) -> List[tuple]:
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _total(text: str, name: str, **match: str) -> float:
    return sum(v for n, labels, v in _samples(text) if n == name and all(labels.get(k) == val for k, val in match.items()))


def _tc_filters(dev: str) -> str:
    out = ""
    for hook in ("ingress", "egress"):
        out += subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True, text=True).stdout
    return out


@pytest.fixture
def agent_container(image: str) -> Iterator[tuple[Container, str]]:
    spec = pod_spec()
    agent = container_of(spec, AGENT)
    assert agent["command"] == ["meshlens", "run"]
    addr = f"127.0.0.1:{free_port()}"
    args = replace_flag(agent["args"], "--metrics-addr", addr)
    args = replace_flag(args, "--kubernetes", "off")  # no API server on this machine
    args = replace_flag(args, "--grpc-listen", f"127.0.0.1:{free_port()}")
    ctr = make_container(spec, AGENT, args=args)
    try:
        yield ctr.start(), addr
    finally:
        ctr.stop()


def test_agent_container_counts_pod_traffic_exactly_and_detaches_on_stop(node, agent_container) -> None:
    ctr, addr = agent_container
    base = f"http://{addr}"
    probe_path = container_of(pod_spec(), AGENT)["readinessProbe"]["httpGet"]["path"]
    ready_via = wait_ready(ctr, base, [probe_path, "/metrics"])
    print(f"\ncontainer ready via {ready_via} (manifest's readiness probe: {probe_path})")
    pid = ctr.pid()
    srv, cli = node.add_pod("csrv"), node.add_pod("ccli")
    n, up, down = 307, 4099, 613
    server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8080",
                            "--count", str(n), "--recv", str(up), "--send", str(down))
    result = run_json(cli, "client", "--host", srv.ipv4, "--port", "8080", "--count", str(n), "--send", str(up))
    assert finish(server) == {"accepted": n, "received": n * up, "sent": n * down}
    assert result == {"connections": n, "sent": n * up, "received": n * down}

    out = dict(**of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8080")
    inb = dict(**of(srv), direction="inbound", network_peer_address=cli.ipv4, server_port="8080")
    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline:
        code, text = http_get(base + "/metrics")
        if (_total(text, "meshlens_tcp_connections_closed_total", **out) == n
                and _total(text, "meshlens_tcp_connections_closed_total", **inb) == n):
            break
        time.sleep(0.5)
    assert _total(text, "meshlens_tcp_connections_closed_total", **out) == n
    assert _total(text, "meshlens_tcp_connections_opened_total", **out) == n
    assert _total(text, "meshlens_tcp_sent_bytes_total", **out) == n * up
    assert _total(text, "meshlens_tcp_received_bytes_total", **out) == n * down
    assert _total(text, "meshlens_tcp_connections_opened_total", **inb) == n
    assert _total(text, "meshlens_tcp_received_bytes_total", **inb) == n * up
    assert _total(text, "meshlens_tcp_sent_bytes_total", **inb) == n * down
    assert _total(text, "meshlens_agent_events_lost_total") == 0

    # tc programs on both pods' host-side veths, held by the container's agent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(f"handle {pid:#x} " in _tc_filters(p.host_veth) for p in (srv, cli)):
        time.sleep(0.2)
    assert all(f"handle {pid:#x} " in _tc_filters(p.host_veth) for p in (srv, cli))
    held = _held_by(pid)
    assert {"handle_set_state_btf", "meshlens_tc_in", "meshlens_tc_eg"} <= set(held.values())
    mem = _container_memory(ctr)
    print(f"container memory (cgroup, BPF maps included): {mem / 2**20:.1f} MiB; "
          f"agent RSS {_total(text, 'meshlens_agent_resident_memory_bytes') / 2**20:.1f} MiB")

    t0 = time.monotonic()
    code = ctr.stop(grace_s=int(pod_spec()["terminationGracePeriodSeconds"]))
    took = time.monotonic() - t0
    print(f"podman stop: exit {code} after {took:.1f} s")
    assert code == 0, ctr.log_text[-3000:]
    assert "all programs detached" in ctr.log_text
    # other agents on this machine (other tests) may attach to these veths too: look for the
    # container agent's own filters, whose handle is its pid (hostPID: the node's pid)
    for p in (srv, cli):
        assert f"handle {pid:#x} " not in _tc_filters(p.host_veth), f"{p.host_veth} keeps the container's filter"
    still = set(held) & set(loaded_programs())
    assert not still, f"programs still loaded after the container stopped: {still}"


def _held_by(pid: int) -> Dict[int, str]:
    from tests.integration.agent_proc import held_prog_ids

    return held_prog_ids(pid)


def _container_memory(ctr: Container) -> int:
    """Memory charged to the container's cgroup (v1 memory controller on this machine)."""
    cg = ctr.inspect("{{.State.CgroupPath}}")
    for path in (f"/sys/fs/cgroup/memory{cg}/memory.usage_in_bytes", f"/sys/fs/cgroup{cg}/memory.current",
                 f"/sys/fs/cgroup/unified{cg}/memory.current"):
        try:
            return int(Path(path).read_text())
        except OSError:
            continue
    return 0
