"""L4 aggregated in the kernel, against ground truth: bytes of a connection that stays open
move every sweep (the iter/tcp sweep, no per-call program) and equal what the peer has
received; a connection storm with the kernel rollup map deliberately too small still gives
exact counts (the overflow path re-aggregates in user space, and says so); a connection
older than the agent is counted from the agent's first sweep; follow mode streams each
connection only while someone listens; the per-call fallback counts the same bytes."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Tuple

import psutil
import pytest

from meshlens.agent.aggregate.flows import FlowTable
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.tcp.facts import ConnEvent
from meshlens.agent.sources.tcp.source import TcpConfig, TcpSource
from tests.integration.agent_proc import AgentProcess
from tests.integration.pods import Pod
from tests.integration.tcp_workload import recv_exact
from tests.integration.test_tcp_l4 import finish, of, run_json, start_listener, tcp_delta

OWN_COMM = psutil.Process().name()[:15]


def connected_pair(srv: Pod, cli: Pod, port: int) -> Tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client end, server end): sockets made in the pods' namespaces by this process."""
    def listen() -> socket.socket:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(8)
        return ls

    ls = srv.in_netns(listen)
    c = cli.in_netns(socket.create_connection, (srv.ipv4, port), 10)
    s, _ = ls.accept()
    return ls, c, s


def exchange(c: socket.socket, s: socket.socket, up: int, down: int) -> Tuple[int, int]:
    """Client sends `up`, server sends `down`; returns what each peer actually received."""
    c.sendall(b"u" * up)
    got_up = recv_exact(s, up)
    s.sendall(b"d" * down)
    got_down = recv_exact(c, down)
    return got_up, got_down


def sweep_after(agent: AgentProcess, sweeps: float, timeout: float = 60.0) -> Callable[..., float]:
    """The first scrape taken after the agent completed `sweeps` sweeps, as a total() lookup."""
    deadline = time.monotonic() + timeout
    while True:
        samples = agent.samples()
        done = sum(x.value for x in samples if x.name == "meshlens_agent_sweeps_total")
        if done >= sweeps or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done >= sweeps, f"the agent did only {done} sweeps in {timeout}s"

    def total(name: str, **match: str) -> float:
        return sum(x.value for x in samples if x.name == name and all(x.labels.get(k) == v for k, v in match.items()))
    return total


def test_open_connection_bytes_grow_every_sweep(node) -> None:
    srv, cli = node.add_pod("long"), node.add_pod("longc")
    with AgentProcess("--features", "l4", sweep_interval=0.25) as agent:
        ls, c, s = connected_pair(srv, cli, 8091)
        try:
            out = dict(netns=str(cli.netns_inode), direction="outbound", network_peer_address=srv.ipv4,
                       server_port="8091")
            inb = dict(netns=str(srv.netns_inode), direction="inbound", server_port="8091")
            sent = received = 0
            history: List[Tuple[int, int, int]] = []
            for i, (up, down) in enumerate([(4099, 613), (65537, 1), (1009, 8191), (3, 100003), (77777, 7)]):
                got_up, got_down = exchange(c, s, up, down)
                sent, received = sent + got_up, received + got_down
                # Ground truth: what each peer has received now. One full sweep later (the
                # sweep under way may have started before the writes) the agent shows exactly it.
                sweeps0 = agent.total("meshlens_agent_sweeps_total")
                seen = sweep_after(agent, sweeps0 + 2)
                assert (seen("meshlens_tcp_sent_bytes_total", **out), seen("meshlens_tcp_received_bytes_total", **out)) \
                    == (sent, received), f"round {i}"
                assert (seen("meshlens_tcp_received_bytes_total", **inb), seen("meshlens_tcp_sent_bytes_total", **inb)) \
                    == (sent, received), f"round {i}"
                assert seen("meshlens_tcp_connections_active", **out) == 1
                history.append((sent, received, int(seen("meshlens_agent_sweeps_total") - sweeps0)))
            assert [h[0] for h in history] == sorted({h[0] for h in history})  # grew every round
            assert agent.total("meshlens_tcp_connections_closed_total", **out) == 0
            print(f"\nlong-lived connection: (sent, received, sweeps until checked) per round {history}")
        finally:
            for sock in (c, s, ls):
                sock.close()
        assert agent.wait_total("meshlens_tcp_connections_closed_total", 1, **out) == 1
        assert agent.total("meshlens_tcp_sent_bytes_total", **out) == sent  # the close adds nothing twice
        assert agent.total("meshlens_agent_kernel_events_total", source="tcp", counter="send_calls") == 0
        assert agent.total("meshlens_agent_kernel_events_total", source="tcp", counter="recv_calls") == 0


def test_storm_with_the_rollup_map_too_small_is_exact(node) -> None:
    srv, cli = node.add_pod("storm"), node.add_pod("stormc")
    n, up, down = 20_000, 17, 5
    with AgentProcess("--features", "l4", "--rollups-map-size", "1", sweep_interval=0.5) as agent:
        s0, c0 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
        server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8093", "--count", str(n),
                                "--recv", str(up), "--send", str(down))
        t0 = time.monotonic()
        result = run_json(cli, "client", "--host", srv.ipv4, "--port", "8093", "--count", str(n), "--send", str(up),
                          "--parallel", "4", timeout=600)
        took = time.monotonic() - t0
        assert finish(server) == {"accepted": n, "received": n * up, "sent": n * down}
        assert result == {"connections": n, "sent": n * up, "received": n * down}
        active, passive = tcp_delta(cli, c0, "ActiveOpens"), tcp_delta(srv, s0, "PassiveOpens")
        assert active == passive == n
        out = dict(**of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8093")
        inb = dict(**of(srv), direction="inbound", network_peer_address=cli.ipv4, server_port="8093")
        assert agent.wait_total("meshlens_tcp_connections_closed_total", n, timeout=60, **out) == n
        assert agent.wait_total("meshlens_tcp_connections_closed_total", n, timeout=60, **inb) == n
        assert agent.total("meshlens_tcp_connections_opened_total", **out) == active
        assert agent.total("meshlens_tcp_connections_opened_total", **inb) == passive
        assert agent.total("meshlens_tcp_sent_bytes_total", **out) == n * up
        assert agent.total("meshlens_tcp_received_bytes_total", **out) == n * down
        assert agent.total("meshlens_tcp_received_bytes_total", **inb) == n * up
        assert agent.total("meshlens_tcp_connection_duration_seconds_count", **inb) == n
        # The overflow path carried them, counted, and nothing was lost on the way.
        overflowed = agent.total("meshlens_agent_kernel_events_total", source="tcp", counter="rollups_full")
        assert overflowed > 0
        assert agent.total("meshlens_agent_events_read_total", source="tcp", type="rollup_overflow") > 0
        assert agent.total("meshlens_agent_events_lost_total", source="tcp", reason="ringbuf_full") == 0
        cpu, _ = agent.usage()
        print(f"\nstorm: {n} connections in {took:.1f}s ({n / took:.0f}/s), {overflowed:.0f} deltas through the "
              f"overflow path; kernel ActiveOpens {active}, PassiveOpens {passive}; agent {cpu:.2f} CPU-s in total")


def test_connection_older_than_the_agent_is_counted_from_its_first_sweep(node) -> None:
    srv, cli = node.add_pod("old"), node.add_pod("oldc")
    ls, c, s = connected_pair(srv, cli, 1234)  # below the ephemeral range: the server side
    try:
        exchange(c, s, 100_003, 50_021)  # before the agent: not counted
        with AgentProcess("--features", "l4", sweep_interval=0.25) as agent:
            unknown = dict(netns=str(cli.netns_inode), direction="unknown", network_peer_address=srv.ipv4,
                           server_port="1234")
            assert agent.wait_total("meshlens_tcp_connections_active", 1, **unknown) == 1
            got_up, got_down = exchange(c, s, 4099, 613)
            assert agent.wait_total("meshlens_tcp_sent_bytes_total", got_up, **unknown) == 4099
            assert agent.total("meshlens_tcp_received_bytes_total", **unknown) == got_down == 613
            assert agent.total("meshlens_tcp_connections_opened_total", **unknown) == 0  # opened before us
            # The server side: the listener predates the agent too; its port makes it inbound.
            inb = dict(netns=str(srv.netns_inode), direction="inbound", network_peer_address=cli.ipv4,
                       server_port="1234")
            assert agent.wait_total("meshlens_tcp_received_bytes_total", 4099, **inb) == 4099
            # The agent finds the old listener's process: connections it accepts now carry its name.
            c2 = cli.in_netns(socket.create_connection, (srv.ipv4, 1234), 10)
            s2, _ = ls.accept()
            exchange(c2, s2, 211, 0)
            c2.close()
            s2.close()
            named = dict(inb, process=OWN_COMM)
            assert agent.wait_total("meshlens_tcp_connections_closed_total", 1, **named) == 1
            assert agent.total("meshlens_tcp_received_bytes_total", **named) == 211
            c.close()
            s.close()
            assert agent.wait_total("meshlens_tcp_connections_closed_total", 1, **unknown) == 1
            assert agent.total("meshlens_tcp_sent_bytes_total", **unknown) == 4099
    finally:
        for sock in (c, s, ls):
            sock.close()


@pytest.fixture
def source_factory() -> Iterator[Callable[..., Tuple[TcpSource, FlowTable]]]:
    started: List[TcpSource] = []

    def make(features: KernelFeatures | None = None) -> Tuple[TcpSource, FlowTable]:
        flows = FlowTable(1000, 600.0)
        src = TcpSource(flows, TcpConfig(), features=features)
        src.start()
        started.append(src)
        return src, flows

    yield make
    for src in started:
        src.stop()


def serve(port: int, n: int, up: int, down: int) -> Tuple[threading.Thread, Dict[str, int]]:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    got = {"received": 0}

    def run() -> None:
        with ls:
            for _ in range(n):
                conn, _ = ls.accept()
                with conn:
                    got["received"] += recv_exact(conn, up)
                    conn.sendall(b"s" * down)
    t = threading.Thread(target=run)
    t.start()
    return t, got


def clients(port: int, n: int, up: int) -> int:
    received = 0
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.sendall(b"c" * up)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
    return received


def test_follow_mode_streams_connections_only_while_someone_follows(source_factory) -> None:
    src, flows = source_factory()
    events: List[ConnEvent] = []
    port, n, up, down = 47113, 3, 4099, 613
    assert not src.following
    t, got = serve(port, n, up, down)
    clients(port, n, up)
    t.join()
    src.sweep(time.monotonic_ns())
    assert src.events_read["open"] == src.events_read["close"] == 0  # nobody followed: no records

    unsubscribe = src.subscribe(lambda e: events.append(e) if e.key.server_port == port else None)
    assert src.following
    t, got = serve(port, n, up, down)
    assert clients(port, n, up) == n * down
    t.join()
    src.sweep(time.monotonic_ns())
    mine = [(e.type, e.key.direction) for e in events]
    assert mine.count(("open", "outbound")) == mine.count(("open", "inbound")) == n
    closes = [e for e in events if e.type == "close"]
    assert sorted((e.key.direction, e.bytes_sent, e.bytes_received) for e in closes) == \
        sorted([("outbound", up, down)] * n + [("inbound", down, up)] * n)
    out_open = [e for e in events if e.type == "open" and e.key.direction == "outbound"]
    assert all(e.peer_port == port and e.local_port > 0 and e.connect_latency_s > 0 for e in out_open)

    unsubscribe()
    assert not src.following
    before = len(events)
    t, _ = serve(port, 1, up, down)
    clients(port, 1, up)
    t.join()
    src.sweep(time.monotonic_ns())
    assert len(events) == before
    # The rollups counted every connection, followed or not.
    totals = [r for k, r in flows.snapshot().rollups.items() if k.server_port == port and k.direction == "outbound"]
    assert sum(r.closed for r in totals) == 2 * n + 1 and sum(r.bytes_sent for r in totals) == (2 * n + 1) * up


def test_per_call_fallback_counts_the_same_bytes(source_factory, monkeypatch) -> None:
    kf = KernelFeatures.probe()
    monkeypatch.setitem(kf.__dict__, "bpf_iter", False)
    src, flows = source_factory(kf)
    assert next(c for c in src.attach_report() if c.signal == "tcp_bytes").chosen == "per-call"
    port, n, up, down = 47114, 5, 8191, 127
    t, got = serve(port, n, up, down)
    assert clients(port, n, up) == n * down
    t.join()
    assert got["received"] == n * up
    src.sweep(time.monotonic_ns())
    rolls = {k.direction: r for k, r in flows.snapshot().rollups.items() if k.server_port == port}
    assert (rolls["outbound"].bytes_sent, rolls["outbound"].bytes_received) == (n * up, n * down)
    assert (rolls["inbound"].bytes_sent, rolls["inbound"].bytes_received) == (n * down, n * up)
    assert rolls["outbound"].closed == rolls["inbound"].closed == n
    assert src.health().kernel_counters["send_calls"] > 0


def test_the_classic_state_tracepoint_counts_what_tp_btf_counts(source_factory, monkeypatch) -> None:
    """Both attach points of the state program at once, on one workload: each exact."""
    btf, btf_flows = source_factory()
    monkeypatch.setenv("MESHLENS_ATTACH_SKIP", "tcp_state/tp_btf")
    classic, classic_flows = source_factory()
    state = lambda src: next(c for c in src.attach_report() if c.signal == "tcp_state")  # noqa: E731
    assert state(btf).chosen == "tp_btf" and state(classic).chosen == "tracepoint"
    assert "tp_btf: skipped ($MESHLENS_ATTACH_SKIP)" in state(classic).tried
    port, n, up, down = 47117, 1009, 4099, 613
    t, got = serve(port, n, up, down)
    assert clients(port, n, up) == n * down
    t.join()
    assert got["received"] == n * up
    for src, flows in ((btf, btf_flows), (classic, classic_flows)):
        src.sweep(time.monotonic_ns())
        rolls = {k.direction: r for k, r in flows.snapshot().rollups.items() if k.server_port == port}
        assert (rolls["outbound"].opened, rolls["outbound"].closed) == (n, n)
        assert (rolls["inbound"].opened, rolls["inbound"].closed) == (n, n)
        assert (rolls["outbound"].bytes_sent, rolls["outbound"].bytes_received) == (n * up, n * down)
        assert (rolls["inbound"].bytes_sent, rolls["inbound"].bytes_received) == (n * down, n * up)
        assert rolls["outbound"].connect_latency.count == n and rolls["inbound"].duration.count == n


def test_a_consume_budget_leaves_the_rest_of_a_flood_in_the_ring_buffer(source_factory) -> None:
    """The runner consumes at most a budget of records per buffer per step, so an event flood
    cannot keep it from its sweeps; what the budget leaves waits in the buffer, none lost."""
    src, _ = source_factory()
    port, n, up, down = 47119, 1009, 7, 3
    events: List[ConnEvent] = []
    unsubscribe = src.subscribe(lambda e: events.append(e) if e.key.server_port == port else None)
    try:
        t, _ = serve(port, n, up, down)
        assert clients(port, n, up) == n * down
        t.join()
        (rb,) = src.ring_buffers()
        before = rb.records
        assert rb.consume(budget=300) == 300 and rb.records - before == 300
        assert rb.consume(budget=301) == 301 and rb.budget_stops == 2
        rest = rb.consume()
        assert rest >= 2 * 2 * n - 601  # an open and a close per end and connection, at least
        mine = [(e.type, e.key.direction) for e in events]
        for kind in ("open", "close"):
            assert mine.count((kind, "outbound")) == mine.count((kind, "inbound")) == n
        assert rb.consume(budget=300) < 300  # drained: the budget is not reached
    finally:
        unsubscribe()
