"""The Kubernetes watcher with the real `kubernetes` client against the fake API server:
initial (paged) list, watch events, resume after a dropped connection from the last
resourceVersion, re-list after 410 (ERROR event and HTTP status), an outage keeps state and
is reported, stop is clean. Every test checks that no thread or server is left behind."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from meshlens.agent.identity.k8s_watch import ALL_RESOURCES, POD, SERVICE, Backoff, KubeWatcher, WatchConfig, api_client
from tests.unit.fake_apiserver import FakeApiServer, load_objects, pod_object

FAST = Backoff(base_s=0.02, cap_s=0.1)
FIXTURES = ("pods", "services", "endpointslices", "replicasets", "deployments", "daemonsets", "statefulsets", "jobs")


class RecordingSink:
    """Keeps the objects like a cache would, and the order of what it was told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: Dict[str, Dict[Tuple[str, str], Dict[str, Any]]] = {}
        self.log: List[Tuple[str, str, str]] = []

    @staticmethod
    def _key(obj: Dict[str, Any]) -> Tuple[str, str]:
        return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    def replace(self, resource: str, objects: List[Dict[str, Any]]) -> None:
        with self.lock:
            self.objects[resource] = {self._key(o): o for o in objects}
            self.log.append(("LIST", resource, str(len(objects))))

    def apply(self, resource: str, event_type: str, obj: Dict[str, Any]) -> None:
        with self.lock:
            table = self.objects.setdefault(resource, {})
            if event_type == "DELETED":
                table.pop(self._key(obj), None)
            else:
                table[self._key(obj)] = obj
            self.log.append((event_type, resource, obj["metadata"]["name"]))

    def count(self, resource: str) -> int:
        with self.lock:
            return len(self.objects.get(resource, {}))

    def names(self, resource: str) -> set:
        with self.lock:
            return {name for _, name in self.objects.get(resource, {})}


def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    assert cond(), "condition not met in time"


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(("k8s-watch-", "fake-apiserver"))]
    assert not left, f"threads left behind: {left}"


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer([o for name in FIXTURES for o in load_objects(name)]) as srv:
        yield srv


def start(srv: FakeApiServer, sink: RecordingSink, **config: Any) -> KubeWatcher:
    config.setdefault("node_name", "node-1")
    config.setdefault("backoff", FAST)
    w = KubeWatcher(api_client(host=srv.url), sink, WatchConfig(**config))
    w.start()
    assert w.wait_synced(5.0)
    return w


@pytest.fixture
def watching(server: FakeApiServer) -> Iterator[Tuple[FakeApiServer, RecordingSink, KubeWatcher]]:
    sink = RecordingSink()
    w = start(server, sink, page_size=3)
    try:
        yield server, sink, w
    finally:
        w.stop()
        w.api.close()


NODE1_PODS = {"frontend-7d4b9c6f5d-x2kq9", "api-5f8d7b9c4-qwz7t", "db-0", "node-exporter-8xk2p",
              "report-28745100-h7x2z", "migrate-5tq8w", "debug", "kube-apiserver-node-1"}


def test_initial_list_is_paged_and_node_filtered(watching) -> None:
    srv, sink, w = watching
    assert sink.names(POD) == NODE1_PODS                    # api-...-mn4lp runs on node-2
    assert sink.names(SERVICE) == {"frontend", "api", "db", "kubernetes"}
    assert sink.count("endpointslices") == 2 and sink.count("replicasets") == 2 and sink.count("jobs") == 2
    pod_lists = srv.list_requests("Pod")
    assert [q.get("continue", "") != "" for q in pod_lists] == [False, True, True]   # 8 pods, pages of 3
    assert all(q["fieldSelector"] == "spec.nodeName=node-1" for q in pod_lists)
    status = w.status()
    assert set(status) == set(ALL_RESOURCES)
    for st in status.values():
        assert st.up and st.synced and st.lists_total == 1 and st.errors_total == 0 and st.last_sync_unix > 0
    assert status[POD].objects == 8
    # the watch starts from the list's resourceVersion, with bookmarks
    eventually(lambda: bool(srv.watch_requests("Pod")))
    first = srv.watch_requests("Pod")[0]
    assert first["resourceVersion"] == status[POD].resource_version
    assert first["allowWatchBookmarks"] == "true" and first["fieldSelector"] == "spec.nodeName=node-1"


def test_watch_events_reach_the_sink_in_order(watching) -> None:
    srv, sink, w = watching
    new = pod_object("web-1", "shop", "11111111-2222-4333-8444-555555555555", "10.244.1.40")
    srv.add(new)
    new["metadata"]["labels"] = {"app": "web", "version": "2"}
    srv.modify(new)
    srv.delete("Pod", "shop", "debug")
    srv.add(pod_object("elsewhere", "shop", "21111111-2222-4333-8444-555555555555", "10.244.2.40", node="node-2"))
    eventually(lambda: w.status()[POD].events_total == 3)
    pod_events = [e for e in sink.log if e[1] == POD and e[0] != "LIST"]
    assert pod_events == [("ADDED", POD, "web-1"), ("MODIFIED", POD, "web-1"), ("DELETED", POD, "debug")]
    assert sink.objects[POD][("shop", "web-1")]["metadata"]["labels"]["version"] == "2"
    assert sink.names(POD) == NODE1_PODS - {"debug"} | {"web-1"}
    assert w.status()[POD].objects == 8


def test_bookmark_moves_the_resume_point_without_events(watching) -> None:
    srv, sink, w = watching
    srv.add(load_objects("cronjobs")[0] | {"kind": "CronJob"})   # another resource moves the global version
    srv.bookmark("Pod")
    eventually(lambda: w.status()[POD].resource_version == str(srv.resource_version))
    assert w.status()[POD].events_total == 0


def test_resume_after_a_dropped_connection_uses_the_last_resource_version(watching) -> None:
    srv, sink, w = watching
    srv.add(pod_object("web-1", "shop", "11111111-2222-4333-8444-555555555555", "10.244.1.40"))
    eventually(lambda: "web-1" in sink.names(POD))
    last_rv = w.status()[POD].resource_version
    before = len(srv.watch_requests("Pod"))
    srv.drop_watches()
    eventually(lambda: len(srv.watch_requests("Pod")) > before)
    assert srv.watch_requests("Pod")[-1]["resourceVersion"] == last_rv
    srv.add(pod_object("web-2", "shop", "31111111-2222-4333-8444-555555555555", "10.244.1.41"))
    eventually(lambda: "web-2" in sink.names(POD))
    st = w.status()[POD]
    assert st.lists_total == 1 and st.relists_gone_total == 0      # resumed, not re-listed
    assert st.up


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_relist_after_410_brings_missed_changes(server: FakeApiServer, gone_as_http: bool) -> None:
    server.gone_as_http = gone_as_http
    sink = RecordingSink()
    w = start(server, sink)
    try:
        server.go_down()
        server.delete("Pod", "shop", "debug")                       # missed while down
        server.add(pod_object("web-1", "shop", "11111111-2222-4333-8444-555555555555", "10.244.1.40"))
        server.compact()                                             # ... and history is gone
        server.come_up()
        eventually(lambda: w.status()[POD].relists_gone_total >= 1 and w.status()[POD].lists_total >= 2)
        eventually(lambda: sink.names(POD) == NODE1_PODS - {"debug"} | {"web-1"})
        eventually(lambda: w.status()[POD].up)
        assert w.status()[POD].resource_version == str(server.resource_version) or w.status()[POD].events_total == 0
    finally:
        w.stop()
        w.api.close()


def test_outage_keeps_state_is_reported_and_recovers(watching) -> None:
    srv, sink, w = watching
    before = {r: sink.count(r) for r in ALL_RESOURCES}
    srv.go_down()
    eventually(lambda: all(not st.up and st.errors_total >= 2 for st in w.status().values()))
    assert {r: sink.count(r) for r in ALL_RESOURCES} == before       # last known state kept
    st = w.status()[POD]
    assert st.synced and ("refused" in st.last_error.lower() or "Connection" in st.last_error)
    srv.come_up()
    eventually(lambda: all(st.up for st in w.status().values()))
    srv.add(pod_object("web-1", "shop", "11111111-2222-4333-8444-555555555555", "10.244.1.40"))
    eventually(lambda: "web-1" in sink.names(POD))
    assert w.status()[POD].lists_total == 1                            # resumed from the last version


def test_list_errors_back_off_then_sync(server: FakeApiServer) -> None:
    server.fail_lists = 3
    sink = RecordingSink()
    w = start(server, sink, resources=(POD,))
    try:
        st = w.status()[POD]
        assert st.errors_total == 3 and st.synced and st.up and st.last_error == ""
        assert sink.names(POD) == NODE1_PODS
    finally:
        w.stop()
        w.api.close()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    b = Backoff(base_s=0.5, cap_s=30.0)
    assert [b.delay(n, rng=lambda: 1.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [b.delay(n, rng=lambda: 0.0) for n in range(3)] == [0.25, 0.5, 1]
    assert b.delay(10_000, rng=lambda: 0.5) == pytest.approx(22.5)


def test_stop_is_prompt_while_watching_and_while_backing_off(server: FakeApiServer) -> None:
    sink = RecordingSink()
    w = start(server, sink)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.name.startswith("k8s-watch-") for t in threading.enumerate())
    w.api.close()
    slow = Backoff(base_s=30.0, cap_s=30.0)
    server.go_down()
    w2 = KubeWatcher(api_client(host=server.url), sink, WatchConfig(node_name="node-1", backoff=slow))
    w2.start()
    eventually(lambda: all(st.errors_total >= 1 for st in w2.status().values()))
    t0 = time.monotonic()
    w2.stop()
    assert time.monotonic() - t0 < 1.0
    w2.api.close()


def test_watch_never_raises_into_the_caller_on_garbage(server: FakeApiServer) -> None:
    """A 404 (resource not served, e.g. an old cluster) is an error for that resource only."""
    sink = RecordingSink()
    w = KubeWatcher(api_client(host=server.url + "/nowhere"), sink, WatchConfig(resources=(POD,), backoff=FAST))
    w.start()
    try:
        eventually(lambda: w.status()[POD].errors_total >= 2)
        assert "404" in w.status()[POD].last_error and not w.status()[POD].synced
    finally:
        w.stop()
        w.api.close()


class PickySink(RecordingSink):
    def apply(self, resource: str, event_type: str, obj: Dict[str, Any]) -> None:
        if obj["metadata"]["name"] == "poison":
            raise KeyError("spec")
        super().apply(resource, event_type, obj)


def test_an_object_the_sink_rejects_is_skipped_not_retried_forever(server: FakeApiServer) -> None:
    sink = PickySink()
    w = start(server, sink, resources=(POD,))
    try:
        server.add(pod_object("poison", "shop", "71111111-2222-4333-8444-555555555555", "10.244.1.60"))
        server.add(pod_object("fine", "shop", "81111111-2222-4333-8444-555555555555", "10.244.1.61"))
        eventually(lambda: "fine" in sink.names(POD))
        st = w.status()[POD]
        assert st.rejected_total == 1 and st.errors_total == 0 and st.up
    finally:
        w.stop()
        w.api.close()


def test_watches_closed_at_once_do_not_spin(server: FakeApiServer) -> None:
    server.watch_timeout_s = 0.0
    sink = RecordingSink()
    w = start(server, sink, resources=(POD,), backoff=Backoff(base_s=0.1, cap_s=0.2))
    try:
        time.sleep(1.0)
        assert 2 <= len(server.watch_requests("Pod")) <= 15
        assert w.status()[POD].errors_total == 0 and w.status()[POD].lists_total == 1
    finally:
        w.stop()
        w.api.close()
