"""Kubernetes API watch: keeps a sink up to date with the objects identity resolution needs.

Place in the data flow: API server --(list + watch, official `kubernetes` client)--> this
module --> a WatchSink (agent/identity/resolver.py's ClusterState) --> IdentityResolver --> exporters.

Watched (one daemon thread per resource, because each watch is a blocking HTTP stream):
pods on this node (field selector spec.nodeName=<node>), and cluster-wide Services and
EndpointSlices (ClusterIP and endpoint address -> service / pod), ReplicaSets and Jobs
(ReplicaSet -> Deployment, Job -> CronJob), Deployments, DaemonSets and StatefulSets
(to name pods on other nodes seen only through EndpointSlices). The set is configurable.

Protocol, per resource, as client-go's reflector does it:
1. list (paged, `limit`/`continue`), hand the whole set to `sink.replace`, remember the
   list's resourceVersion;
2. watch from that resourceVersion with bookmarks, passing each event to `sink.apply` and
   remembering the resourceVersion of the last event or bookmark;
3. when the stream ends (server timeout, dropped connection) watch again from the last
   resourceVersion: no re-list, nothing missed;
4. on 410 Gone (as an HTTP status or an ERROR event) the resourceVersion is too old: re-list;
5. on any other error: exponential backoff with jitter, then resume (re-list if never listed).

The sink is never cleared by an error: an outage keeps the last known state. What happens is
reported per resource by `status()` (WatchStatus: up, synced, counters, last sync time,
last error) for the agent's own metrics. Nothing raised in a watch thread reaches the agent.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("meshlens.k8s")

from meshlens.agent.identity.k8s_kinds import (  # noqa: F401 - re-exported for callers of this module
    ALL_RESOURCES, DAEMONSET, DEPLOYMENT, ENDPOINTSLICE, JOB, POD, REPLICASET, SERVICE, STATEFULSET,
)
HTTP_GONE = 410
MIN_QUIET_WATCH_S = 1.0   # a watch closed sooner than this with no event backs off before the next


class WatchSink(Protocol):
    def replace(self, resource: str, objects: List[Dict[str, Any]]) -> None:
        """The complete current set of `resource` objects (after a list)."""

    def apply(self, resource: str, event_type: str, obj: Dict[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED event; `obj` is the raw API object (a dict)."""


def _list_function(api: k8s.ApiClient, resource: str, namespace: str = "") -> Callable[..., Any]:
    """The client's list call for `resource` (also the watch call with watch=True): all
    namespaces, or only `namespace` (what a namespaced Role allows)."""
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    if namespace:
        batch, disc = k8s.BatchV1Api(api), k8s.DiscoveryV1Api(api)
        fn = {
            POD: core.list_namespaced_pod,
            SERVICE: core.list_namespaced_service,
            ENDPOINTSLICE: disc.list_namespaced_endpoint_slice,
            REPLICASET: apps.list_namespaced_replica_set,
            DEPLOYMENT: apps.list_namespaced_deployment,
            DAEMONSET: apps.list_namespaced_daemon_set,
            STATEFULSET: apps.list_namespaced_stateful_set,
            JOB: batch.list_namespaced_job,
        }[resource]
        return functools.partial(fn, namespace)
    return {
        POD: core.list_pod_for_all_namespaces,
        SERVICE: core.list_service_for_all_namespaces,
        ENDPOINTSLICE: k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        REPLICASET: apps.list_replica_set_for_all_namespaces,
        DEPLOYMENT: apps.list_deployment_for_all_namespaces,
        DAEMONSET: apps.list_daemon_set_for_all_namespaces,
        STATEFULSET: apps.list_stateful_set_for_all_namespaces,
        JOB: k8s.BatchV1Api(api).list_job_for_all_namespaces,
    }[resource]


def api_client(kubeconfig: Optional[str] = None, in_cluster: Optional[bool] = None,
               host: Optional[str] = None) -> k8s.ApiClient:
    """An ApiClient from a URL (tests), a kubeconfig file, or the pod's service account.

    in_cluster=None picks the service account when KUBERNETES_SERVICE_HOST is set, else the
    default kubeconfig. urllib3's own retries are off: the watcher's backoff is the only one.
    """
    cfg = k8s.Configuration(host=host) if host else k8s.Configuration()
    if not host:
        if kubeconfig:
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        elif in_cluster or (in_cluster is None and os.environ.get("KUBERNETES_SERVICE_HOST")):
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(client_configuration=cfg)
    cfg.retries = False
    # one streaming connection per watched resource plus lists: more than the default pool on small nodes
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, 2 * len(ALL_RESOURCES))
    return k8s.ApiClient(cfg)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter: attempt n waits base*factor^n capped at `cap`,
    scaled by a random factor in [0.5, 1)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        raw = min(self.cap_s, self.base_s * self.factor ** min(attempt, 32))
        return raw * (0.5 + 0.5 * rng())


@dataclass(frozen=True)
class WatchConfig:
    node_name: str = ""                     # pods are watched only on this node; "" = every node
    resources: Tuple[str, ...] = ALL_RESOURCES
    namespace: str = ""                     # "" = all namespaces; else list and watch in this one only
    label_selector: str = ""                # for every resource's list and watch ("" = all objects)
    page_size: int = 500                    # list `limit`
    watch_timeout_s: Tuple[int, int] = (300, 600)  # server-side timeout, random in range (as client-go)
    connect_timeout_s: float = 10.0
    list_read_timeout_s: float = 60.0
    backoff: Backoff = Backoff()


@dataclass(frozen=True)
class WatchStatus:
    """One resource's watch, for metrics (meshlens_k8s_watch_* families)."""

    resource: str
    up: bool = False              # the last request succeeded and no error since
    synced: bool = False          # at least one complete list has been applied
    objects: int = 0              # objects currently known from this resource
    lists_total: int = 0
    relists_gone_total: int = 0   # lists forced by 410 Gone
    watches_total: int = 0        # watch requests opened (resumes included)
    events_total: int = 0
    errors_total: int = 0
    rejected_total: int = 0       # objects or lists the sink could not take (skipped)
    last_sync_unix: float = 0.0   # wall time of the last completed list
    last_event_unix: float = 0.0
    resource_version: str = ""
    last_error: str = ""


class _Gone(Exception):
    pass


class _Stopped(Exception):
    pass


def _shutdown_stream(resp: Any) -> None:
    """Unblock a thread reading a streaming response: shut its socket down."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class KubeWatcher:
    """List+watch of every configured resource into `sink`, each in its own daemon thread.

    start() returns at once; `wait_synced()` blocks until each resource has listed once (or a
    timeout). stop() ends every watch (closing its socket) and joins the threads.
    """

    def __init__(self, api: k8s.ApiClient, sink: WatchSink, config: WatchConfig = WatchConfig(),
                 rng: Callable[[], float] = random.random, wall: Callable[[], float] = time.time) -> None:
        self.api = api
        self.sink = sink
        self.config = config
        self._rng = rng
        self._wall = wall
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status: Dict[str, WatchStatus] = {r: WatchStatus(r) for r in config.resources}
        self._watches: Dict[str, k8s_watch.Watch] = {}
        self._streams: Dict[str, Any] = {}  # open watch responses, to cut on stop()
        self._resume: Dict[str, str] = {}   # resourceVersion to watch from; "" = list first
        self._threads: List[threading.Thread] = []

    # -- lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for resource in self.config.resources:
            t = threading.Thread(target=self._run, args=(resource,), name=f"k8s-watch-{resource}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            watches = list(self._watches.values())
            streams = list(self._streams.values())
        for w in watches:
            w.stop()
        for resp in streams:
            _shutdown_stream(resp)  # the blocked read returns at once
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("watch thread %s did not stop within %.1fs", t.name, timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> "KubeWatcher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.synced for s in self.status().values()):
                return True
            self._stop.wait(0.02)
        return all(s.synced for s in self.status().values())

    def status(self) -> Dict[str, WatchStatus]:
        with self._lock:
            return dict(self._status)

    def _update(self, resource: str, **changes: Any) -> None:
        with self._lock:
            self._status[resource] = replace(self._status[resource], **changes)

    def _count(self, resource: str, name: str, by: int = 1, **changes: Any) -> None:
        with self._lock:
            st = self._status[resource]
            self._status[resource] = replace(st, **{name: getattr(st, name) + by}, **changes)

    # -- one resource

    def _run(self, resource: str) -> None:
        fn = _list_function(self.api, resource, self.config.namespace)
        failures = 0
        while not self._stop.is_set():
            rv = self._resume.get(resource, "")
            try:
                if not rv:
                    rv = self._list(resource, fn)
                started = time.monotonic()
                events = self._watch(resource, fn, rv)
                if events or time.monotonic() - started >= MIN_QUIET_WATCH_S:
                    failures = 0
                else:  # closed at once with nothing in it (a proxy?): do not spin
                    self._stop.wait(self.config.backoff.delay(failures, self._rng))
                    failures += 1
            except _Gone:
                log.info("k8s %s: resourceVersion %s too old, re-listing", resource, rv)
                self._resume[resource] = ""
                self._count(resource, "relists_gone_total")
            except Exception as exc:  # noqa: BLE001 - an outage must never reach the agent
                if self._stop.is_set():
                    break
                delay = self.config.backoff.delay(failures, self._rng)
                failures += 1
                msg = _describe(exc)
                log.warning("k8s %s: %s; retrying in %.1fs", resource, msg, delay)
                self._count(resource, "errors_total", up=False, last_error=msg)
                self._stop.wait(delay)

    def _selectors(self, resource: str) -> Dict[str, str]:
        """The field and label selectors of `resource`'s list and watch calls."""
        out: Dict[str, str] = {}
        if resource == POD and self.config.node_name:
            out["field_selector"] = f"spec.nodeName={self.config.node_name}"
        if self.config.label_selector:
            out["label_selector"] = self.config.label_selector
        return out

    def _list(self, resource: str, fn: Callable[..., Any]) -> str:
        items: List[Dict[str, Any]] = []
        token: Optional[str] = None
        rv = ""
        while True:
            kwargs: Dict[str, Any] = dict(limit=self.config.page_size, _preload_content=False,
                                          _request_timeout=(self.config.connect_timeout_s, self.config.list_read_timeout_s))
            if token:
                kwargs["_continue"] = token
            kwargs.update(self._selectors(resource))
            try:
                resp = fn(**kwargs)
            except ApiException as exc:
                if exc.status == HTTP_GONE and token:  # continue token expired: list again from the start
                    items, token = [], None
                    continue
                raise
            try:
                if not 200 <= resp.status < 300:
                    raise ApiException(status=resp.status, reason=resp.reason)
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            page_meta = body.get("metadata") or {}
            if not token:
                rv = str(page_meta.get("resourceVersion", ""))
            items.extend(body.get("items") or [])
            token = page_meta.get("continue") or None
            if not token:
                break
        self._deliver(resource, lambda: self.sink.replace(resource, items))
        self._resume[resource] = rv
        self._count(resource, "lists_total", up=True, synced=True, objects=len(items),
                    last_sync_unix=self._wall(), resource_version=rv, last_error="")
        return rv

    def _watch(self, resource: str, fn: Callable[..., Any], rv: str) -> int:
        """Watch from `rv` until the stream ends; return how many events (bookmarks included)
        came. Each event's resourceVersion is recorded at once, so a broken stream resumes
        from the last one seen."""
        seen = 0
        w = k8s_watch.Watch(return_type=object)   # events' objects stay plain dicts

        def call(**kwargs: Any) -> Any:
            resp = fn(**kwargs)
            with self._lock:  # registered under the lock that stop() takes: no window to miss
                if self._stop.is_set():
                    resp.close()
                    raise _Stopped()
                self._streams[resource] = resp
            if 200 <= getattr(resp, "status", 200) < 300:
                self._count(resource, "watches_total", up=True, last_error="")
            return resp

        low, high = self.config.watch_timeout_s
        kwargs: Dict[str, Any] = dict(
            resource_version=rv, allow_watch_bookmarks=True,
            timeout_seconds=int(low + (high - low) * self._rng()),
            _request_timeout=(self.config.connect_timeout_s, high + 30.0),
        )
        kwargs.update(self._selectors(resource))
        with self._lock:
            if self._stop.is_set():
                return 0
            self._watches[resource] = w
        try:
            for event in w.stream(call, **kwargs):
                seen += 1
                event_type = event.get("type", "")
                obj = event.get("raw_object") or {}
                new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._deliver(resource, lambda: self.sink.apply(resource, event_type, obj))
                    self._count(resource, "events_total", last_event_unix=self._wall(),
                                objects=self._objects(resource))
                if new_rv:
                    self._resume[resource] = new_rv
                    self._update(resource, resource_version=new_rv)
                if self._stop.is_set():
                    break
        except ApiException as exc:
            if exc.status == HTTP_GONE:
                raise _Gone() from exc
            raise
        except _Stopped:
            pass
        finally:
            with self._lock:
                self._watches.pop(resource, None)
                self._streams.pop(resource, None)
        return seen

    def _deliver(self, resource: str, call: Callable[[], None]) -> None:
        """Hand data to the sink; an object the sink cannot digest is counted and skipped, so
        one odd object cannot stop the watch (retrying it would fail forever)."""
        try:
            call()
        except Exception:  # noqa: BLE001
            log.exception("k8s %s: the sink rejected an object; skipped", resource)
            self._count(resource, "rejected_total")

    def _objects(self, resource: str) -> int:
        """How many objects the sink holds for `resource`, if it can tell (a `count` method)."""
        count = getattr(self.sink, "count", None)
        if callable(count):
            return int(count(resource))
        with self._lock:
            return self._status[resource].objects


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]
