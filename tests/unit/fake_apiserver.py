"""A local Kubernetes API server for tests: real API objects over the real list/watch protocol.

No API server exists on the development machines, so the agent's watcher (agent/identity/k8s_watch.py,
the official `kubernetes` client underneath) is tested against this one. It speaks what the
client relies on:

- GET <collection> lists: `{"kind": "PodList", "apiVersion": "v1", "metadata":
  {"resourceVersion": "N"}, "items": [...]}` (items without kind/apiVersion, as the real
  server sends them), with `fieldSelector` (equality on spec.nodeName, metadata.namespace,
  metadata.name), `labelSelector` (equality, `!=`), `limit` and `continue` (pages of one
  consistent snapshot); namespaced collections (`.../namespaces/NS/<resource>`) too.
- GET <collection>?watch=1&resourceVersion=N: a chunked stream of newline-delimited events
  `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}`, replaying what happened
  after N, then following live changes until `timeoutSeconds` or until the test cuts it.
  A resourceVersion older than the last compaction gets an ERROR event with a 410 Status
  (what the real server does), or an HTTP 410 response if `gone_as_http` is set.

Test controls: `add`/`modify`/`delete` objects at any time; `drop_watches()` cuts every
open watch connection abruptly; `compact()` makes every older resourceVersion "too old";
`go_down()`/`come_up()` close and reopen the listening socket on the same port (connection
refused in between); `requests` records every request's path and query.

Objects come from JSON fixtures under tests/unit/k8s_objects/ (copied from real API output)
or from `pod_object()` and friends, which fill those fixtures in with test values.
"""
from __future__ import annotations

import copy
import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

OBJECTS_DIR = Path(__file__).resolve().parent / "k8s_objects"

# collection path (all namespaces) -> (kind, apiVersion)
RESOURCES: Dict[str, Tuple[str, str]] = {
    "/api/v1/pods": ("Pod", "v1"),
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/apis/apps/v1/replicasets": ("ReplicaSet", "apps/v1"),
    "/apis/apps/v1/deployments": ("Deployment", "apps/v1"),
    "/apis/apps/v1/daemonsets": ("DaemonSet", "apps/v1"),
    "/apis/apps/v1/statefulsets": ("StatefulSet", "apps/v1"),
    "/apis/batch/v1/jobs": ("Job", "batch/v1"),
    "/apis/batch/v1/cronjobs": ("CronJob", "batch/v1"),
}
PATH_OF_KIND = {kind: path for path, (kind, _) in RESOURCES.items()}
Event = Tuple[int, str, Dict[str, Any]]   # (resourceVersion, type, object)


def collection(url_path: str) -> Tuple[str, str]:
    """'/apis/G/V/namespaces/NS/R' or '/api/v1/namespaces/NS/R' -> ('/apis/G/V/R', 'NS');
    an all-namespaces path -> (itself, '')."""
    parts = url_path.split("/")
    if "namespaces" in parts:
        i = parts.index("namespaces")
        if len(parts) == i + 3:
            return "/".join(parts[:i] + parts[i + 2:]), parts[i + 1]
    return url_path, ""


def kubeconfig(path: str, url: str) -> None:
    """Write a kubeconfig that points a real client at the fake API server at `url`."""
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "t",
                   "clusters": [{"name": "t", "cluster": {"server": url}}],
                   "users": [{"name": "t", "user": {"token": "fake"}}],
                   "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}, f)


def load_objects(name: str) -> List[Dict[str, Any]]:
    """The objects of fixture file k8s_objects/<name>.json (a JSON list), deep-copied."""
    with open(OBJECTS_DIR / f"{name}.json") as f:
        return json.load(f)


def _fixture(name: str, index: int = 0) -> Dict[str, Any]:
    return copy.deepcopy(load_objects(name)[index])


def owner_ref(kind: str, name: str, uid: str = "", api_version: str = "apps/v1") -> Dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name,
            "uid": uid or f"00000000-0000-4000-8000-{abs(hash((kind, name))) % 10**12:012d}",
            "controller": True, "blockOwnerDeletion": True}


def pod_object(name: str, namespace: str, uid: str, ip: str, node: str = "node-1",
               ipv6: str = "", owner: Optional[Dict[str, Any]] = None, host_network: bool = False,
               container_id: str = "", runtime: str = "containerd") -> Dict[str, Any]:
    """A Pod as the API returns it (from the fixture), with these test values filled in."""
    pod = _fixture("pods")
    meta = pod["metadata"]
    meta.update(name=name, namespace=namespace, uid=uid, generateName="")
    meta["ownerReferences"] = [owner] if owner else []
    pod["spec"]["nodeName"] = node
    pod["spec"]["hostNetwork"] = host_network
    status = pod["status"]
    status["podIP"] = ip
    status["podIPs"] = [{"ip": ip}] + ([{"ip": ipv6}] if ipv6 else [])
    if container_id:
        scheme = {"cri-o": "cri-o", "crio": "cri-o"}.get(runtime, runtime)
        for cs in status.get("containerStatuses", []):
            cs["containerID"] = f"{scheme}://{container_id}"
    return pod


def service_object(name: str, namespace: str, cluster_ips: List[str]) -> Dict[str, Any]:
    svc = _fixture("services")
    svc["metadata"].update(name=name, namespace=namespace, uid=f"svc-{namespace}-{name}")
    svc["spec"]["clusterIP"] = cluster_ips[0] if cluster_ips else "None"
    svc["spec"]["clusterIPs"] = cluster_ips or ["None"]
    return svc


class FakeApiServer:
    """Threaded list/watch server on 127.0.0.1; use as a context manager (stops everything)."""

    def __init__(self, objects: Optional[List[Dict[str, Any]]] = None, watch_poll_s: float = 0.05,
                 gone_as_http: bool = False) -> None:
        self._lock = threading.Condition()
        self._rv = itertools.count(1000)
        self.resource_version = next(self._rv)
        self._objects: Dict[str, Dict[Tuple[str, str], Dict[str, Any]]] = {p: {} for p in RESOURCES}
        self._events: Dict[str, List[Event]] = {p: [] for p in RESOURCES}
        self._compacted = 0
        self._cut_generation = 0
        self._snapshots: Dict[str, List[Dict[str, Any]]] = {}   # paged lists, by continue token
        self._snap_ids = itertools.count(1)
        self.watch_poll_s = watch_poll_s
        self.gone_as_http = gone_as_http
        self.fail_lists = 0            # the next N list requests get a 500
        self.watch_timeout_s: Optional[float] = None   # end every watch (cleanly) after this long
        self.requests: List[Tuple[str, Dict[str, str]]] = []
        self.open_watches = 0
        self._connections: set = set()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0
        for obj in objects or ():
            self.add(obj)
        self.come_up()

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def come_up(self) -> None:
        """Listen (again, on the same port after go_down) and serve in a background thread."""
        if self._server is not None:
            return
        server = _QuietServer(("127.0.0.1", self.port), _handler_class(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-apiserver-{self.port}", daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        """Stop listening and cut every open watch: clients see connection refused/reset."""
        server, self._server = self._server, None
        if server is None:
            return
        self.drop_watches()
        server.shutdown()
        server.server_close()
        with self._lock:  # idle keep-alive connections too: a down server answers nothing
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._wait_watches_closed()

    def close(self) -> None:
        self.go_down()

    def __enter__(self) -> "FakeApiServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_watches_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.open_watches and time.monotonic() < deadline:
                self._lock.wait(0.05)

    # -- objects

    @staticmethod
    def _key(obj: Dict[str, Any]) -> Tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace", ""), meta["name"]

    def _record(self, kind_path: str, event_type: str, obj: Dict[str, Any]) -> Dict[str, Any]:
        obj = copy.deepcopy(obj)
        kind, api_version = RESOURCES[kind_path]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        rv = next(self._rv)
        self.resource_version = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        self._events[kind_path].append((rv, event_type, obj))
        self._lock.notify_all()
        return obj

    def add(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        """Create (or replace) an object; watchers get ADDED (MODIFIED if it existed)."""
        path = PATH_OF_KIND[obj["kind"]]
        with self._lock:
            existed = self._key(obj) in self._objects[path]
            stored = self._record(path, "MODIFIED" if existed else "ADDED", obj)
            self._objects[path][self._key(obj)] = stored
            return copy.deepcopy(stored)

    def modify(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        return self.add(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        path = PATH_OF_KIND[kind]
        with self._lock:
            obj = self._objects[path].pop((namespace, name))
            self._record(path, "DELETED", obj)

    def bookmark(self, kind: str) -> None:
        """Send a BOOKMARK carrying the current resourceVersion to watchers of `kind`."""
        path = PATH_OF_KIND[kind]
        with self._lock:
            self._record(path, "BOOKMARK", {"kind": kind, "metadata": {}})

    def get(self, kind: str, namespace: str, name: str) -> Dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._objects[PATH_OF_KIND[kind]][(namespace, name)])

    # -- failure injection

    def drop_watches(self) -> None:
        """Cut every open watch connection without a final chunk (the client sees a broken stream)."""
        with self._lock:
            self._cut_generation += 1
            self._lock.notify_all()
        self._wait_watches_closed()

    def compact(self) -> None:
        """Forget history: watches from any resourceVersion before now get 410 Gone."""
        with self._lock:
            self._compacted = self.resource_version
            for path in self._events:
                self._events[path] = []
            self._lock.notify_all()

    def watch_requests(self, kind: str) -> List[Dict[str, str]]:
        path = PATH_OF_KIND[kind]
        return [q for p, q in list(self.requests) if collection(p)[0] == path and q.get("watch") in ("1", "true", "True")]

    def list_requests(self, kind: str) -> List[Dict[str, str]]:
        path = PATH_OF_KIND[kind]
        return [q for p, q in list(self.requests)
                if collection(p)[0] == path and q.get("watch") not in ("1", "true", "True")]

    # -- serving (called from handler threads)

    @staticmethod
    def _labels_match(obj: Dict[str, Any], selector: str) -> bool:
        """Equality-based label selector (`k=v,k2==v2,k3!=v3`), as the real server reads it."""
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for term in filter(None, selector.split(",")):
            if "!=" in term:
                k, _, v = term.partition("!=")
                if labels.get(k.strip()) == v.strip():
                    return False
                continue
            k, _, v = term.partition("=")
            if labels.get(k.strip()) != v.lstrip("=").strip():
                return False
        return True

    def _matches(self, obj: Dict[str, Any], selector: str, label_selector: str = "") -> bool:
        if not self._labels_match(obj, label_selector):
            return False
        for term in filter(None, selector.split(",")):
            field, _, want = term.partition("=")
            field = field.rstrip("=!")
            value: Any = obj
            for part in field.split("."):
                value = value.get(part, "") if isinstance(value, dict) else ""
            if str(value or "") != want.lstrip("="):
                return False
        return True

    def list_body(self, path: str, query: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        kind, api_version = RESOURCES[path]
        with self._lock:
            if self.fail_lists > 0:
                self.fail_lists -= 1
                return 500, _status(500, "InternalError", "injected failure")
            token = query.get("continue", "")
            if token:
                snap_id, rv, offset_s = (token.split(":") + ["", "", ""])[:3]
                items = self._snapshots.get(snap_id)
                if items is None:
                    return 410, _status(410, "Expired", "the continue token is no longer valid")
                offset = int(offset_s)
            else:
                rv, offset = str(self.resource_version), 0
                snap_id = str(next(self._snap_ids))
                items = []
                for obj in self._objects[path].values():
                    if self._matches(obj, query.get("fieldSelector", ""), query.get("labelSelector", "")):
                        item = copy.deepcopy(obj)
                        item.pop("kind", None)
                        item.pop("apiVersion", None)
                        items.append(item)
                items.sort(key=lambda o: self._key(o))
                self._snapshots[snap_id] = items
            limit = int(query.get("limit") or 0) or len(items) or 1
            page = items[offset:offset + limit]
            meta: Dict[str, Any] = {"resourceVersion": rv}
            if offset + limit < len(items):
                meta["continue"] = f"{snap_id}:{rv}:{offset + limit}"
            return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": page}

    def watch_events(self, path: str, query: Dict[str, str], alive: "callable") -> Iterator[Optional[Dict[str, Any]]]:
        """Events after resourceVersion; yields None as a heartbeat while idle. Ends on timeout
        or when the test cuts watches (then raises ConnectionAbortedError)."""
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 3600)
        if self.watch_timeout_s is not None:
            timeout = min(timeout, self.watch_timeout_s)
        deadline = time.monotonic() + timeout
        selector = query.get("fieldSelector", "")
        with self._lock:
            generation = self._cut_generation
            if since and since < self._compacted:
                yield {"type": "ERROR", "object": _status(410, "Expired",
                                                          f"too old resource version: {since} ({self._compacted})")}
                return
        while time.monotonic() < deadline and alive():
            with self._lock:
                if self._cut_generation != generation:
                    raise ConnectionAbortedError("watch cut by the test")
                pending = [e for e in self._events[path] if e[0] > since]
                if not pending:
                    self._lock.wait(self.watch_poll_s)
                    pending = [e for e in self._events[path] if e[0] > since]
                if self._cut_generation != generation:
                    raise ConnectionAbortedError("watch cut by the test")
            if not pending:
                yield None
                continue
            for rv, event_type, obj in pending:
                since = rv
                if event_type == "BOOKMARK":
                    if query.get("allowWatchBookmarks") in ("true", "True", "1"):
                        yield {"type": "BOOKMARK", "object": obj}
                elif self._matches(obj, selector, query.get("labelSelector", "")):
                    yield {"type": event_type, "object": obj}


class _QuietServer(ThreadingHTTPServer):
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that go away (or connections the test cuts) are normal here."""


def _status(code: int, reason: str, message: str) -> Dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _handler_class(api: FakeApiServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with api._lock:
                api._connections.add(self.connection)

        def finish(self) -> None:
            with api._lock:
                api._connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send_json(self, code: int, body: Dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            api.requests.append((url.path, query))
            path, namespace = collection(url.path)
            if path not in RESOURCES:
                self._send_json(404, _status(404, "NotFound", f"{url.path} not found"))
                return
            if namespace:       # a namespaced collection: the all-namespaces one, restricted
                query["fieldSelector"] = ",".join(filter(None, [query.get("fieldSelector", ""),
                                                                f"metadata.namespace={namespace}"]))
            if query.get("watch") in ("1", "true", "True"):
                self._watch(path, query)
            else:
                self._send_json(*api.list_body(path, query))

        def _watch(self, path: str, query: Dict[str, str]) -> None:
            since = int(query.get("resourceVersion") or 0)
            with api._lock:
                too_old = since and since < api._compacted
                api.open_watches += 1
            try:
                if too_old and api.gone_as_http:
                    self._send_json(410, _status(410, "Expired", "too old resource version"))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                for event in api.watch_events(path, query, lambda: api._server is not None):
                    if event is None:
                        continue
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except ConnectionAbortedError:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with api._lock:
                    api.open_watches -= 1
                    api._lock.notify_all()

    return Handler
