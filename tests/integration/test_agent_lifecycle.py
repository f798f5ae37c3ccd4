"""The agent's lifecycle on the real kernel: it detaches everything on SIGTERM and SIGINT,
a crash leaves nothing attached and a restart does not stack a second copy, a second instance
is refused, and the attach fallback really falls back when the kernel refuses a variant."""
from __future__ import annotations

import signal
import time
import subprocess

import pytest

from meshlens.agent.aggregate.flows import FlowTable
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.tcp.source import TcpSource
from tests.integration.agent_proc import MESHLENS, AgentProcess, held_prog_ids, loaded_programs
from tests.integration.test_tcp_l4 import finish, of, run_json, start_listener

TCP_PROGRAMS = {"handle_set_state_btf", "sweep_conns", "adopt_tcp", "handle_retransmit", "handle_retransmit_synack",
                "handle_send_reset", "handle_receive_reset"}
PER_CALL_PROGRAMS = {"handle_send_length", "handle_recv_length"}


def held(agent: AgentProcess) -> dict:
    assert agent.proc is not None
    return held_prog_ids(agent.proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_detaches_every_program(sig: int) -> None:
    agent = AgentProcess().start()
    try:
        programs = held(agent)
        assert TCP_PROGRAMS <= set(programs.values())
        assert not PER_CALL_PROGRAMS & set(programs.values()), "per-call byte programs attached by default"
    finally:
        code = agent.stop(sig)
    assert code == 0
    still = set(programs) & set(loaded_programs())
    assert still == set(), f"programs still loaded after {signal.Signals(sig).name}: {still}"


# tc filters (interface counters, L7 from packets) outlive a killed agent; stale ones are removed at start
TC_PROGRAMS = {"meshlens_tc_in", "meshlens_tc_eg", "meshlens_l7_in", "meshlens_l7_eg"}


def test_crash_then_restart_cleans_up_and_counts_once(node) -> None:
    """SIGKILL: programs attached through links (tracepoints) die with the process; tc
    filters live in the interface's qdisc and outlive it, so the next start removes them
    rather than stacking a second copy."""
    srv, cli = node.add_pod("after"), node.add_pod("crash")  # veths for the tc programs
    crashed = AgentProcess().start()
    deadline = time.monotonic() + 5
    while not TC_PROGRAMS <= set(held(crashed).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    programs = held(crashed)
    assert TCP_PROGRAMS | TC_PROGRAMS <= set(programs.values())
    crashed.stop(signal.SIGKILL)
    assert crashed.exit_code == -signal.SIGKILL
    alive = {pid: name for pid, name in loaded_programs().items() if pid in programs}
    assert not (set(alive.values()) - TC_PROGRAMS), f"link-attached programs outlived the process: {alive}"

    with AgentProcess() as agent:
        deadline = time.monotonic() + 5
        while set(programs) & set(loaded_programs()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(programs) & set(loaded_programs()) == set(), "the restart left the crashed agent's tc filters"
        names = sorted(held(agent).values())
        assert sorted(set(names)) == names, f"a program is attached twice: {names}"
        # the new agent's own filters (handle = its pid; other agents on this machine may add
        # theirs): one per hook and veth, none stacked
        pid = agent.proc.pid
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _filter_count(srv.host_veth, pid) != (1, 1):
            time.sleep(0.1)
        for pod in (srv, cli):
            assert _filter_count(pod.host_veth, pid) == (1, 1), f"{pod.host_veth}: {_filter_count(pod.host_veth, pid)}"
        server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8082", "--count", "17",
                                "--recv", "211", "--send", "0")
        run_json(cli, "client", "--host", srv.ipv4, "--port", "8082", "--count", "17", "--send", "211")
        finish(server)
        out = dict(**of(cli), direction="outbound")
        assert agent.wait_total("meshlens_tcp_connections_closed_total", 17, **out) == 17
        assert agent.total("meshlens_tcp_sent_bytes_total", **out) == 17 * 211


def _filter_count(dev: str, pid: int) -> tuple:
    """(ingress, egress) meshlens tc filters of the agent `pid` (their handle) on dev."""
    out = []
    for hook in ("ingress", "egress"):
        text = subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True, text=True).stdout
        out.append(sum(1 for line in text.splitlines() if f"handle {pid:#x} " in line and "meshlens-tc-" in line))
    return tuple(out)


def test_second_instance_is_refused() -> None:
    with AgentProcess() as first:
        second = subprocess.run([MESHLENS, "run", "--state-dir", first.state_dir, "--metrics-addr", "127.0.0.1:1"],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "another meshlens agent" in second.stderr
        assert first.proc.poll() is None  # the first one is unaffected


def test_bad_arguments_give_a_clear_error() -> None:
    res = subprocess.run([MESHLENS, "run", "--sweep-interval", "0"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip() == "meshlens: sweep_interval: Input should be greater than 0 (from flag --sweep-interval)"
    res = subprocess.run([MESHLENS, "run", "--metrics-addr", "nonsense"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "bad listen address 'nonsense'" in res.stderr


def test_fallback_when_the_kernel_refuses_the_preferred_variant(monkeypatch) -> None:
    """Pretend the kernel refuses the fentry probe and has no BPF iterators: bytes fall back
    to the per-call tracepoints, saying why."""
    kf = KernelFeatures.probe()
    monkeypatch.setitem(kf.__dict__, "bpf_iter", False)
    src = TcpSource(FlowTable(100, 60.0), features=kf)
    src.start()
    try:
        bytes_choice = next(c for c in src.attach_report() if c.signal == "tcp_bytes")
        assert bytes_choice.chosen == "per-call"
        assert bytes_choice.programs == ["handle_send_length", "handle_recv_length"]
        assert any(t.startswith("iter: BPF iterators unavailable") for t in bytes_choice.tried), bytes_choice.tried
    finally:
        src.stop()


def test_check_reports_each_requirement_and_attach_point() -> None:
    res = subprocess.run([MESHLENS, "check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "√ kernel BTF available" in res.stdout
    assert "√ tcp/tcp_state: tp_btf [handle_set_state_btf]" in res.stdout
    assert "√ tcp/tcp_bytes: iter [sweep_conns, adopt_tcp]" in res.stdout
    assert "Status check results are √" in res.stdout


def test_features_choose_the_capture_layers() -> None:
    """--features l4 attaches only the TCP programs; an unknown feature is refused up front."""
    with AgentProcess("--features", "l4") as agent:
        names = set(held(agent).values())
        assert TCP_PROGRAMS <= names
        assert not any(n.startswith(("enter_", "exit_", "meshlens_tc")) for n in names), names
    res = subprocess.run([MESHLENS, "run", "--features", "l4,quic"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown quic" in res.stderr
