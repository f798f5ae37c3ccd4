"""The scale-out path with real parts: Prometheus in agent mode scrapes the node agent (as
a cluster's Prometheus does through the ServiceMonitor) and remote-writes to a second
Prometheus with the remote-write receiver on (standing in for Thanos/Mimir); PromQL on the
receiver reads back the workload's exact numbers."""
from __future__ import annotations

from tests.integration.agent_proc import AgentProcess
from tests.integration.servers import Prometheus
from tests.integration.test_tcp_l4 import finish, run_json, start_listener


def test_agent_mode_remote_writes_exact_numbers_to_long_term_storage(node) -> None:
    srv, cli = node.add_pod("rwsrv"), node.add_pod("rwcli")
    n, up, down = 73, 2053, 389
    with AgentProcess() as agent, \
            Prometheus([], remote_write_receiver=True) as store, \
            Prometheus([agent.addr], agent_mode=True, remote_write_url=f"{store.url}/api/v1/write"):
        server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "9091", "--count", str(n),
                                "--recv", str(up), "--send", str(down))
        run_json(cli, "client", "--host", srv.ipv4, "--port", "9091", "--count", str(n), "--send", str(up))
        finish(server)
        sel = f'netns="{cli.netns_inode}",cgroup="/{cli.cgroup_relpath}",direction="outbound"'
        got = store.wait_for(f"sum(meshlens_tcp_sent_bytes_total{{{sel}}})",
                             lambda r: bool(r) and float(r[0]["value"][1]) == n * up, timeout=60)
        assert float(got[0]["value"][1]) == n * up
        assert float(store.query(f"sum(meshlens_tcp_connections_closed_total{{{sel}}})")[0]["value"][1]) == n
        assert float(store.query(f"sum(meshlens_tcp_received_bytes_total{{{sel}}})")[0]["value"][1]) == n * down
        # the series carry the target labels of the agent-mode scrape that forwarded them
        (series,) = store.query(f'sum by (job, instance) (meshlens_tcp_sent_bytes_total{{{sel}}})')
        assert series["metric"] == {"job": "meshlens-test", "instance": agent.addr}
