"""The gRPC Observer's own logic: filters (the REST endpoint's meaning), the bounded client
queue and its lost_events, the relay's sort window, and the real grpcio server/relay over
loopback fed by a fake agent (events made here, so every count is known)."""
from __future__ import annotations

import threading
import time
from typing import List

import grpc
import pytest

from meshlens.agent.identity.model import Workload
from meshlens.exporter.api import filters as F
from meshlens.exporter.grpc.convert import (compile_filter, conn_flow, filter_from_params, http_flows, response,
                                            selector, time_ns)
from meshlens.exporter.grpc.hub import FlowHub
from meshlens.exporter.grpc.observer import serve_agent
from meshlens.exporter.grpc.relay import Relay, RelayConfig, SortWindow
from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg
from tests.unit.grpc_fakes import FakeAgent, PodIdentity, conn, tap

FRONTEND = Workload("shop", "frontend-7d4b9c6f5d-x2kq9", "Deployment", "frontend")
API = Workload("shop", "api-5f8d7b9c4-q8w2e", "Deployment", "api")
IDENT = PodIdentity({101: FRONTEND, 102: API}, {"10.1.0.2": FRONTEND, "10.1.0.3": API})


def flows_of_one_exchange() -> List[pb.Flow]:
    t = time.time_ns()
    out = [conn_flow(conn("open", 101, "outbound", "10.1.0.2", 40001, "10.1.0.3", 80), IDENT, "node-a", t),
           conn_flow(conn("open", 102, "inbound", "10.1.0.3", 80, "10.1.0.2", 40001), IDENT, "node-a", t)]
    out += http_flows(tap(102, "server", "GET", 503, "/status/{id}", "10.1.0.3", 80, "10.1.0.2"), IDENT, "node-a", t)
    return out


@pytest.mark.parametrize("params, expected", [
    ({}, [1, 1, 1, 1]),
    ({"from_pod": "frontend"}, [1, 1, 1, 1]),               # the response's client is frontend too
    ({"to_pod": "frontend"}, [0, 0, 0, 0]),
    ({"pod": "shop/api"}, [1, 1, 1, 1]),
    ({"to_workload": "deploy/api"}, [1, 1, 1, 1]),
    ({"to_workload": "sts/api"}, [0, 0, 0, 0]),
    ({"direction": "ingress"}, [0, 1, 1, 1]),
    ({"direction": "outbound"}, [1, 0, 0, 0]),
    ({"http_status": "5+"}, [0, 0, 0, 1]),                # only responses carry a status
    ({"http_status": "404"}, [0, 0, 0, 0]),
    ({"protocol": "http"}, [0, 0, 1, 1]),
    ({"protocol": "tcp"}, [1, 1, 1, 1]),                  # HTTP runs over TCP (as REST's tcp)
    ({"protocol": "dns"}, [0, 0, 0, 0]),
    ({"port": 80}, [1, 1, 1, 1]),
    ({"port": 8080}, [0, 0, 0, 0]),
    ({"to_ip": "10.1.0.0/24", "from_ip": "10.1.0.2"}, [1, 1, 1, 1]),
    ({"peer_ip": "192.168.0.0/16"}, [0, 0, 0, 0]),
    ({"type": "L7"}, [0, 0, 1, 1]),
    ({"node_name": "node-b"}, [0, 0, 0, 0]),
])
def test_filters_mean_what_the_rest_parameters_mean(params, expected) -> None:
    c = compile_filter(filter_from_params(params))
    assert [int(c.matches(f)) for f in flows_of_one_exchange()] == expected


def test_bad_filter_values_are_the_rest_errors() -> None:
    for params, param in (({"http_status": "6"}, "http_status"), ({"to_ip": "nope"}, "to_ip"),
                          ({"direction": "up"}, "direction"), ({"workload": "rs/x"}, "workload"),
                          ({"protocol": "sctp"}, "protocol")):
        with pytest.raises(F.ParamError) as err:
            compile_filter(filter_from_params(params))
        assert err.value.param == param


def test_whitelist_is_ored_blacklist_subtracted_and_mask_applied() -> None:
    req = pb.GetFlowsRequest(whitelist=[pb.FlowFilter(direction="egress"), pb.FlowFilter(http_status="5+")],
                             blacklist=[pb.FlowFilter(type=pb.L4)])
    req.field_mask.paths.extend(["l7.http.code", "source.pod_name"])
    sel = selector(req)
    got = [sel.shape(response(f)) for f in flows_of_one_exchange() if sel.wants(response(f))]
    assert len(got) == 1
    assert got[0].flow.l7.http.code == 503 and got[0].flow.source.pod_name == API.pod
    assert got[0].flow.destination.pod_name == "" and got[0].flow.summary == ""   # masked out
    # node_status passes every filter (a gap is never hidden) unless all filters name other nodes
    from meshlens.exporter.grpc.convert import node_status
    down = node_status("node-c", pb.NodeStatusEvent.NODE_UNAVAILABLE, ["node-c"])
    assert sel.wants(down)
    assert not selector(pb.GetFlowsRequest(whitelist=[pb.FlowFilter(node_name="node-b")])).wants(down)
    assert selector(pb.GetFlowsRequest(whitelist=[pb.FlowFilter(node_name="node-c")])).wants(down)


def test_stalled_subscriber_gets_lost_events_at_the_gap() -> None:
    hub = FlowHub("node-a", ring_size=8, queue_size=5)
    _, sub = hub.subscribe()
    flows = [response(f) for f in flows_of_one_exchange()] * 5       # 20 responses
    for r in flows[:12]:
        hub.publish(r)
    got = [sub.get(0) for _ in range(5)]
    assert all(g.WhichOneof("response_types") == "flow" for g in got)
    hub.publish(flows[12])                      # the gap is reported before the next flow
    lost = sub.get(0)
    assert lost.WhichOneof("response_types") == "lost_events"
    assert lost.lost_events.num_events_lost == 7
    assert lost.lost_events.source == pb.LostEvent.OBSERVER_EVENTS_QUEUE
    assert sub.get(0) is flows[12] and sub.get(0) is None
    for r in flows[13:20]:                      # 7 more: 5 queued, 2 lost, nothing newer
        hub.publish(r)
    kinds = [sub.get(0) for _ in range(6)]
    assert kinds[-1].lost_events.num_events_lost == 2
    assert hub.lost_to_clients() == 9 and len(hub.past()) == 8 and hub.ring_dropped == 12


def test_sort_window_releases_in_time_order_and_is_bounded() -> None:
    out: List[pb.GetFlowsResponse] = []
    now = [8_500_000_000]
    w = SortWindow(1.0, 4, out.append, clock_ns=lambda: now[0])

    def at(t_ms: int, node: str) -> pb.GetFlowsResponse:
        r = pb.GetFlowsResponse(node_name=node)
        r.time.FromNanoseconds(t_ms * 1_000_000)
        return r
    for t, n in ((8300, "b"), (8100, "a"), (8200, "c")):
        w.push(at(t, n))
    assert w.release() == 0 and out == []      # all younger than the window (now - 1 s = 7.5 s)
    now[0] = 9_400_000_000
    assert w.release() == 3
    assert [r.node_name for r in out] == ["a", "c", "b"]
    for t in (9500, 9400, 9600, 9700, 9800):   # the 5th push forces the oldest (9400) out
        w.push(at(t, "x"))
    assert w.forced == 1 and [time_ns(r) // 1_000_000 for r in out[3:]] == [9400]
    now[0] = 20_000_000_000
    w.release()
    times = [time_ns(r) for r in out]
    assert times == sorted(times) and len(out) == 8 and w.late == 0
    w.push(at(9000, "late"))
    w.release()
    assert w.late == 1 and out[-1].node_name == "late"


# ---- real grpcio over loopback ---------------------------------------------------------------

class Follower:
    """A client following a server in a thread, keeping every response."""

    def __init__(self, port: int, req: pb.GetFlowsRequest) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = pbg.ObserverStub(self.channel).GetFlows(req)
        self.got: List[pb.GetFlowsResponse] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.got.append(r)
        except grpc.RpcError:
            pass

    def flows(self) -> List[pb.Flow]:
        return [r.flow for r in self.got if r.WhichOneof("response_types") == "flow"]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_agent_stream_follow_switch_filters_and_history() -> None:
    agent = FakeAgent(IDENT)
    obs = serve_agent(agent, "node-a", "127.0.0.1:0")
    try:
        port = obs.server.port
        assert not agent.tcp.following and agent.taps == 0
        everything = Follower(port, pb.GetFlowsRequest(follow=True))
        only_5xx = Follower(port, pb.GetFlowsRequest(follow=True, whitelist=[pb.FlowFilter(http_status="5+")]))
        assert wait(lambda: agent.tcp.following and agent.taps == 1)     # one switch for both clients
        for i in range(13):
            agent.tcp.emit(conn("close", 101, "outbound", "10.1.0.2", 41000 + i, "10.1.0.3", 80,
                                bytes_sent=4099, bytes_received=1009, duration_s=0.25))
        agent.tap = [tap(102, "server", "GET", 200 if i % 3 else 503, "/items/{id}", "10.1.0.3", 80, "10.1.0.2")
                     for i in range(7)]
        assert wait(lambda: len(everything.flows()) == 13 + 14)
        l4 = [f for f in everything.flows() if f.type == pb.L4]
        assert len(l4) == 13 and {f.l4.bytes_sent for f in l4} == {4099} and {f.l4.bytes_received for f in l4} == {1009}
        assert {(f.source.pod_name, f.destination.pod_name) for f in l4} == {(FRONTEND.pod, API.pod)}
        replies = [f for f in everything.flows() if f.is_reply]
        assert sorted(f.l7.http.code for f in replies) == [200, 200, 200, 200, 503, 503, 503]
        assert wait(lambda: len(only_5xx.flows()) == 3)
        time.sleep(0.3)                         # the tap poller runs again: nothing is published twice
        assert len(everything.flows()) == 27 and len(only_5xx.flows()) == 3
        everything.close()
        only_5xx.close()
        assert wait(lambda: not agent.tcp.following and agent.taps == 0)  # the last follower left: off
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.ObserverStub(ch)
            past = list(stub.GetFlows(pb.GetFlowsRequest(number=5)))
            assert len(past) == 5 and all(r.flow.is_reply for r in past[-1:])
            st = stub.ServerStatus(pb.ServerStatusRequest())
            assert st.seen_flows == 27 and st.num_flows == 27 and st.num_connected_nodes == 1
            assert [n.name for n in stub.GetNodes(pb.GetNodesRequest()).nodes] == ["node-a"]
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GetFlows(pb.GetFlowsRequest(whitelist=[pb.FlowFilter(http_status="6")])))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "http_status" in err.value.details()
    finally:
        obs.stop()


def test_kernel_ring_buffer_losses_reach_followers() -> None:
    agent = FakeAgent(IDENT)
    obs = serve_agent(agent, "node-a", "127.0.0.1:0")
    try:
        f = Follower(obs.server.port, pb.GetFlowsRequest(follow=True))
        assert wait(lambda: agent.tcp.following)
        time.sleep(0.2)
        agent.tcp.lost += 11
        agent.tap_dropped += 2
        assert wait(lambda: any(r.WhichOneof("response_types") == "lost_events" for r in f.got), timeout=5)
        lost = [r.lost_events for r in f.got if r.WhichOneof("response_types") == "lost_events"]
        assert sum(x.num_events_lost for x in lost) == 13 and lost[0].source == pb.LostEvent.PERF_EVENT_RING_BUFFER
        f.close()
    finally:
        obs.stop()


def test_relay_merges_in_time_order_and_reports_nodes() -> None:
    agents = [FakeAgent(IDENT) for _ in range(3)]
    servers = [serve_agent(a, f"node-{n}", "127.0.0.1:0") for a, n in zip(agents, "abc")]
    ports = [s.server.port for s in servers]
    relay = Relay(RelayConfig(agents=tuple(f"127.0.0.1:{p}" for p in ports), sort_window_s=0.5,
                              backoff_initial_s=0.1, backoff_max_s=0.4)).start()
    from meshlens.exporter.grpc.observer import GrpcServer
    rs = GrpcServer(relay.servicer, "127.0.0.1:0").start()
    try:
        assert wait(lambda: all(a.tcp.following for a in agents))
        assert wait(lambda: relay.status().num_connected_nodes == 3)      # idle agents count as connected
        f = Follower(rs.port, pb.GetFlowsRequest(follow=True))
        assert wait(lambda: relay.servicer.streams == 1)
        base = time.monotonic_ns()
        sent = 0
        for i in range(30):                     # interleaved in time, each node sent late by another
            a = agents[i % 3]
            a.tcp.emit(conn("open", 101, "outbound", "10.1.0.2", 42000 + i, "10.1.0.3", 80,
                            ts_ns=base - (30 - i) * 1_000_000 - (i % 3) * 5_000_000))
            sent += 1
        assert wait(lambda: len(f.flows()) == sent)
        times = [f_.time.ToNanoseconds() for f_ in f.flows()]
        assert times == sorted(times)
        assert {fl.node_name for fl in f.flows()} == {"node-a", "node-b", "node-c"}
        assert len({(fl.node_name, fl.source.port) for fl in f.flows()}) == 30      # each exactly once
        servers[1].stop()
        assert wait(lambda: any(r.WhichOneof("response_types") == "node_status"
                                and r.node_status.state_change == pb.NodeStatusEvent.NODE_UNAVAILABLE
                                and list(r.node_status.node_names) == ["node-b"] for r in f.got), timeout=5)
        st = relay.status()
        assert st.num_connected_nodes == 2 and list(st.unavailable_nodes) == ["node-b"]
        agents[1] = FakeAgent(IDENT)
        servers[1] = serve_agent(agents[1], "node-b", f"127.0.0.1:{ports[1]}")
        assert wait(lambda: agents[1].tcp.following, timeout=5)
        agents[1].tcp.emit(conn("open", 101, "outbound", "10.1.0.2", 43000, "10.1.0.3", 80))
        assert wait(lambda: any(fl.node_name == "node-b" and fl.source.port == 43000 for fl in f.flows()))
        def states_b() -> List[str]:
            return [pb.NodeStatusEvent.StateChange.Name(r.node_status.state_change) for r in list(f.got)
                    if r.WhichOneof("response_types") == "node_status" and r.node_status.node_names[0] == "node-b"]
        # (the first connections may still have been in the sort window when the client came)
        assert wait(lambda: states_b()[-2:] == ["NODE_UNAVAILABLE", "NODE_CONNECTED"]), states_b()
        assert relay.status().num_connected_nodes == 3
        f.close()
    finally:
        rs.stop()
        relay.stop()
        for s in servers:
            s.stop()
