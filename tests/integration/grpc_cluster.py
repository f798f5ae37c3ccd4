"""Three simulated nodes on one machine for the gRPC Observer tests: per node a bridge with
a client pod and an nginx pod, a real agent (`meshlens run --grpc-listen`, Kubernetes
names from one fake API server, each agent watching its own node's pods and streaming only
their events: --grpc-pods-only), and a real `meshlens relay` in front of the three.

Ground truth: each nginx's access log (requests by status) and the HTTP client's own report.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import grpc

from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg
from tests.integration.agent_proc import MESHLENS, AgentProcess
from tests.integration.l7_helpers import run_py
from tests.integration.pods import Node, Pod
from tests.integration.servers import Nginx, free_port
from tests.unit.fake_apiserver import FakeApiServer, pod_object

NODES = ("node-a", "node-b", "node-c")
NAMESPACE = "shop"

# keep-alive HTTP client: one connection, the given paths, prints {status: count}
CLIENT = r'''
import http.client, json, sys
host, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=10)
got = {}
for path, n in plan:
    for _ in range(n):
        conn.request("GET", path)
        r = conn.getresponse(); r.read()
        got[str(r.status)] = got.get(str(r.status), 0) + 1
conn.close()
print(json.dumps(got))
'''


def wait_until(pred, timeout: float = 20.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


class Follower:
    """A GetFlows stream read in a thread; every response kept with its arrival time."""

    def __init__(self, target: str, req: pb.GetFlowsRequest, credentials: Optional[grpc.ChannelCredentials] = None,
                 read: bool = True) -> None:
        self.channel = (grpc.secure_channel(target, credentials) if credentials
                        else grpc.insecure_channel(target))
        self.call = pbg.ObserverStub(self.channel).GetFlows(req)
        self.got: List[Tuple[float, pb.GetFlowsResponse]] = []
        self.error: Optional[grpc.RpcError] = None
        self._lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        if read:
            self.start()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for r in self.call:
                with self._lock:
                    self.got.append((time.monotonic(), r))
        except grpc.RpcError as exc:
            self.error = exc

    def responses(self, kind: Optional[str] = None) -> List[pb.GetFlowsResponse]:
        with self._lock:
            rs = [r for _, r in self.got]
        return [r for r in rs if kind is None or r.WhichOneof("response_types") == kind]

    def flows(self, node: Optional[str] = None) -> List[pb.Flow]:
        return [r.flow for r in self.responses("flow") if node is None or r.node_name == node]

    def close(self) -> None:
        self.call.cancel()
        if self.thread is not None:
            self.thread.join(5)
        self.channel.close()


class RelayProcess:
    def __init__(self, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="meshlens-relay-")
        self.log_path = os.path.join(self.dir, "relay.log")
        self.args = [MESHLENS, "relay", "--listen", self.addr, "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
                     *args]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "RelayProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        ok = wait_until(lambda: self.proc.poll() is not None or self._serving(), timeout=15)
        if self.proc.poll() is not None or not ok:
            raise RuntimeError(f"relay did not start:\n{self.log()}")
        return self

    def _serving(self) -> bool:
        try:
            self.metrics_text()
            return True
        except OSError:
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-4000:] if os.path.exists(self.log_path) else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def status(target: str, credentials: Optional[grpc.ChannelCredentials] = None) -> pb.ServerStatusResponse:
    ch = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with ch:
        return pbg.ObserverStub(ch).ServerStatus(pb.ServerStatusRequest(), timeout=5)


def nodes(target: str) -> List[pb.Node]:
    with grpc.insecure_channel(target) as ch:
        return list(pbg.ObserverStub(ch).GetNodes(pb.GetNodesRequest(), timeout=5).nodes)


class SimNode:
    """One simulated node: its bridge, a client and an nginx pod, and (when started) its agent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.node = Node()
        short = name.split("-")[1]
        self.client = self.node.add_pod(f"client-{short}", NAMESPACE, uid=str(uuid.uuid4()))
        self.web = self.node.add_pod(f"web-{short}", NAMESPACE, uid=str(uuid.uuid4()))
        self.client_pod = f"client-{short}-0"
        self.web_pod = f"web-{short}-0"
        self.nginx: Optional[Nginx] = None
        self.agent: Optional[AgentProcess] = None
        self.grpc_port = free_port()
        self.grpc_addr = f"127.0.0.1:{self.grpc_port}"

    def objects(self) -> List[dict]:
        return [pod_object(self.client_pod, NAMESPACE, self.client.uid, self.client.ipv4, node=self.name,
                           container_id=self.client.container_id),
                pod_object(self.web_pod, NAMESPACE, self.web.uid, self.web.ipv4, node=self.name,
                           container_id=self.web.container_id)]

    def start_agent(self, kc: str, *extra: str) -> AgentProcess:
        self.agent = AgentProcess("--kubeconfig", kc, "--node-name", self.name, "--features", "l4,l7",
                                  "--grpc-listen", self.grpc_addr, "--grpc-pods-only", *extra).start(timeout=90)
        return self.agent

    def synced(self) -> bool:
        assert self.agent is not None
        with urllib.request.urlopen(f"http://{self.agent.addr}/api/v1/status", timeout=5) as r:
            w = json.loads(r.read())["identity"]["watches"]
        return bool(w) and all(x["synced"] for x in w.values())

    def load(self, plan: List[Tuple[str, int]]) -> Dict[str, int]:
        out = run_py(self.client, CLIENT, self.web.ipv4, "80", json.dumps(plan))
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.nginx is not None:
            self.nginx.stop()
        self.node.close()
