"""The series budget on the real kernel: thousands of distinct external client addresses (a
/20 of source addresses on one pod's interface) reach a server pod; the server's series keep
at most --external-peers-per-workload addresses, the rest fold into one `external` peer,
the fold counter says how many connections were folded, and the folded totals still equal
the exact bytes and connections. A flow storm (50,000 short connections from many ports and
addresses) keeps the agent's memory under the DaemonSet's limit while scrapes keep
answering."""
from __future__ import annotations

import ipaddress
import random
import threading
import time
import urllib.request
from typing import Dict, List

import pytest
import yaml
from pyroute2 import IPRoute

from tests.integration.agent_proc import AgentProcess
from tests.integration.pods import Pod
from tests.integration.test_tcp_l4 import finish, of, run_json, start_listener
from tests.manifests import DAEMONSET_DIR

CAP = 16


def _source_net(count: int) -> ipaddress.IPv4Network:
    """A random /20 of 198.18.0.0/15 (the benchmarking range: never a real peer)."""
    net = ipaddress.IPv4Network(f"198.{random.choice((18, 19))}.{random.randrange(16) * 16}.0/20")
    assert count < net.num_addresses - 2
    return net


def _add_sources(cli: Pod, srv: Pod, net: ipaddress.IPv4Network, count: int) -> None:
    """`count` addresses of `net` on the client pod's eth0; the server routes `net` back to it."""
    def add() -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            for i in range(count):
                ipr.addr("add", index=idx, address=str(net.network_address + 1 + i), prefixlen=32)

    def route() -> None:
        with IPRoute() as ipr:
            ipr.route("add", dst=str(net), gateway=cli.ipv4)

    cli.in_netns(add)
    srv.in_netns(route)


def _server_series(agent: AgentProcess, srv: Pod, name: str) -> Dict[str, float]:
    """peer address -> value of the server pod's inbound series called `name`."""
    out: Dict[str, float] = {}
    for s in agent.samples():
        if s.name == name and all(s.labels.get(k) == v for k, v in of(srv).items()) \
                and s.labels.get("direction") == "inbound":
            out[s.labels["network_peer_address"]] = out.get(s.labels["network_peer_address"], 0) + s.value
    return out


def test_thousands_of_external_clients_fold_into_exact_totals(node) -> None:
    srv, cli = node.add_pod("fsrv"), node.add_pod("fcli")
    n, up, down = 3001, 4099, 613
    net = _source_net(n)
    _add_sources(cli, srv, net, n)
    # no re-ranking during the test (each address moves the same bytes once; unit tests rank)
    with AgentProcess("--external-peers-per-workload", str(CAP), "--max-series", "2000000",
                      "--peer-rerank-interval", "3600") as agent:
        folded0 = agent.total("meshlens_agent_flow_peers_folded_total")
        server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8080",
                                "--count", str(n), "--recv", str(up), "--send", str(down))
        result = run_json(cli, "client", "--host", srv.ipv4, "--port", "8080", "--count", str(n),
                          "--send", str(up), "--parallel", "8", "--source-net", str(net), "--source-count", str(n),
                          timeout=300)
        assert finish(server) == {"accepted": n, "received": n * up, "sent": n * down}
        assert result == {"connections": n, "sent": n * up, "received": n * down}
        agent.wait_total("meshlens_tcp_connections_closed_total", n, timeout=30, direction="inbound", **of(srv))

        closed = _server_series(agent, srv, "meshlens_tcp_connections_closed_total")
        kept = {a for a in closed if a != "external"}
        print(f"\n{n} client addresses -> {len(closed)} server series: {len(kept)} kept, "
              f"external={closed.get('external')}")
        assert len(kept) == CAP and kept <= {str(net.network_address + 1 + i) for i in range(n)}
        assert all(closed[a] == 1 for a in kept)
        assert closed["external"] == n - CAP
        assert sum(closed.values()) == n
        assert sum(_server_series(agent, srv, "meshlens_tcp_connections_opened_total").values()) == n
        assert sum(_server_series(agent, srv, "meshlens_tcp_received_bytes_total").values()) == n * up
        assert sum(_server_series(agent, srv, "meshlens_tcp_sent_bytes_total").values()) == n * down
        # the folding is counted (other workloads on this machine may fold too: at least ours)
        assert agent.total("meshlens_agent_flow_peers_folded_total") - folded0 >= n - CAP
        # the same cap holds for the per-peer handshake RTT series of the server pod's interface
        rtt_peers = {s.labels["network_peer_address"] for s in agent.samples()
                     if s.name == "meshlens_pod_interface_handshake_rtt_seconds_count"
                     and s.labels.get("netns") == str(srv.netns_inode)}
        assert len(rtt_peers) <= CAP + 1 and "external" in rtt_peers
        assert agent.total("meshlens_agent_rtt_peers_folded") >= n - CAP
        # the client side has one peer (the server): nothing of it folds
        out = dict(**of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8080")
        assert agent.total("meshlens_tcp_sent_bytes_total", **out) == n * up


def _memory_limit_bytes() -> int:
    ds = yaml.safe_load((DAEMONSET_DIR / "daemonset.yaml").read_text())
    q = ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert q.endswith("Mi")
    return int(q[:-2]) << 20


def test_flow_storm_stays_bounded_and_scrapes_answer(node) -> None:
    """50,000 short connections from 500 addresses and ephemeral ports: the fold and
    kernel-map overflow paths run, RSS stays under the DaemonSet's memory limit, every
    scrape during the storm answers, and the totals stay exact."""
    srv, cli = node.add_pod("ssrv"), node.add_pod("scli")
    n, sources, up, down = 50_000, 500, 211, 97
    net = _source_net(sources)
    _add_sources(cli, srv, net, sources)
    limit = _memory_limit_bytes()
    # a budget no other test's traffic on this machine can exhaust: only the per-workload cap folds
    with AgentProcess("--external-peers-per-workload", str(CAP), "--max-series", "2000000",
                      "--peer-rerank-interval", "3600") as agent:
        _, rss0 = agent.usage()
        folded0 = agent.total("meshlens_agent_flow_peers_folded_total")
        scrapes: List[float] = []
        failures: List[str] = []
        peak = [rss0]
        done = threading.Event()

        def scrape() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(f"http://{agent.addr}/metrics", timeout=10) as r:
                        r.read()
                    scrapes.append(time.monotonic() - t0)
                except OSError as exc:
                    failures.append(str(exc))
                peak[0] = max(peak[0], agent.usage()[1])
                done.wait(0.5)

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        t0 = time.monotonic()
        try:
            server = start_listener(srv, "server", "--host", "0.0.0.0", "--port", "8080",
                                    "--count", str(n), "--recv", str(up), "--send", str(down))
            result = run_json(cli, "client", "--host", srv.ipv4, "--port", "8080", "--count", str(n),
                              "--send", str(up), "--parallel", "16", "--source-net", str(net),
                              "--source-count", str(sources), timeout=600)
            assert finish(server) == {"accepted": n, "received": n * up, "sent": n * down}
            assert result == {"connections": n, "sent": n * up, "received": n * down}
            storm_s = time.monotonic() - t0
            agent.wait_total("meshlens_tcp_connections_closed_total", n, timeout=20, direction="inbound", **of(srv))
        finally:
            done.set()
            scraper.join(15)
        closed = _server_series(agent, srv, "meshlens_tcp_connections_closed_total")
        received = _server_series(agent, srv, "meshlens_tcp_received_bytes_total")
        lost = agent.total("meshlens_agent_events_lost_total")
        by_dir = {}
        for smp in agent.samples():
            if smp.name == "meshlens_tcp_connections_closed_total" and smp.labels.get("netns") == str(srv.netns_inode):
                k = (smp.labels["direction"], smp.labels["cgroup"], smp.labels["process"])
                by_dir[k] = by_dir.get(k, 0) + smp.value
        print("\nserver netns closes by (direction, cgroup, process):", by_dir)
        opened = _server_series(agent, srv, "meshlens_tcp_connections_opened_total")
        active = _server_series(agent, srv, "meshlens_tcp_connections_active")
        print(f"\nserver side: opened {sum(opened.values()):.0f} closed {sum(closed.values()):.0f} "
              f"active {sum(active.values()):.0f}; live connections {agent.total('meshlens_agent_flows_live'):.0f}; "
              f"rollup overflows {agent.total('meshlens_agent_flow_overflows_total'):.0f}")
        print(f"\nstorm: {n} connections in {storm_s:.1f} s ({n / storm_s:.0f}/s); agent RSS {rss0 / 2**20:.1f} MiB "
              f"before, peak {peak[0] / 2**20:.1f} MiB (limit {limit >> 20} MiB); {len(scrapes)} scrapes, "
              f"slowest {max(scrapes):.2f} s; folded {agent.total('meshlens_agent_flow_peers_folded_total') - folded0:.0f}; "
              f"kernel records lost/diverted {lost:.0f}")
        assert not failures, failures[:3]
        assert len(scrapes) >= 3
        assert peak[0] < limit
        assert len(closed) == CAP + 1  # the storm's 500 addresses: 16 kept, the rest in `external`
        # every source made n / sources connections: the 16 kept ones have their own series, the
        # rest were each folded once into `external`, and counted (other workloads may fold too)
        assert n % sources == 0
        assert closed["external"] == n - CAP * (n // sources)
        assert agent.total("meshlens_agent_flow_peers_folded_total") - folded0 >= closed["external"]
        assert lost == 0
        assert sum(closed.values()) == n
        assert sum(received.values()) == n * up
