"""A real Prometheus (Debian package) scrapes the running agent; values read back through
Prometheus' HTTP query API equal the workload's known numbers."""
from __future__ import annotations

from tests.integration.agent_proc import AgentProcess
from tests.integration.servers import Prometheus
from tests.integration.test_tcp_l4 import finish, run_json, start_listener


def test_prometheus_reads_exact_tcp_numbers(node) -> None:
    srv, cli = node.add_pod("promsrv"), node.add_pod("promcli")
    n, up, down = 101, 3001, 997
    with AgentProcess() as agent, Prometheus([agent.addr], scrape_interval="1s") as prom:
        server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "9090", "--count", str(n),
                                "--recv", str(up), "--send", str(down))
        run_json(cli, "client", "--host", srv.ipv4, "--port", "9090", "--count", str(n), "--send", str(up))
        finish(server)
        sel = f'netns="{cli.netns_inode}",cgroup="/{cli.cgroup_relpath}"'
        sent = f'sum(meshlens_tcp_sent_bytes_total{{{sel},direction="outbound"}})'
        got = prom.wait_for(sent, lambda r: bool(r) and float(r[0]["value"][1]) == n * up, timeout=30)
        assert float(got[0]["value"][1]) == n * up
        closed = prom.query(f'sum(meshlens_tcp_connections_closed_total{{{sel}}})')
        recv = prom.query(f'sum(meshlens_tcp_received_bytes_total{{{sel}}})')
        assert float(closed[0]["value"][1]) == n
        assert float(recv[0]["value"][1]) == n * down
        up_q = prom.query(f'up{{instance="{agent.addr}"}}')
        assert float(up_q[0]["value"][1]) == 1
