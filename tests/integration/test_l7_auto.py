"""`--l7-source auto`: pod traffic from packets, what never crosses a pod veth (loopback inside
a pod) from syscalls, and every request counted exactly once, against nginx's access log."""
from __future__ import annotations

from typing import Iterator

import pytest

from meshlens.agent.sources.l7.select import BothHttpSource
from tests.integration.l7_helpers import counts_by_request, diff_counts, log_counts, run_py, series_for, settle, started_source
from tests.integration.pods import Node
from tests.integration.servers import Nginx

LOOP = "import http.client, sys\nc = http.client.HTTPConnection(sys.argv[1], 80)\n" \
       "for p in sys.argv[2:]:\n    c.request('GET', p); c.getresponse().read()\n"


@pytest.fixture(scope="module")
def l7() -> Iterator[BothHttpSource]:
    yield from started_source("auto")


@pytest.fixture(scope="module")
def env(l7):
    with Node() as node:
        web = node.add_pod("web")
        client = node.add_pod("client")
        with Nginx(web) as nginx:
            yield web, client, nginx


def test_pod_traffic_once_and_loopback_from_syscalls(l7, env) -> None:
    web, client, nginx = env
    settle(l7, 0.3)   # both pods registered with the syscall path
    srv0 = counts_by_request(series_for(l7, web, "server", 80))
    cli0 = counts_by_request(series_for(l7, client, "client", 80))
    n_log = len(nginx.access_log_entries())
    pod_paths = ["/status/200", "/status/404", "/bytes/613"] * 5 + ["/status/503"]
    run_py(client, LOOP, web.ipv4, *pod_paths)
    loop_paths = ["/status/201"] * 7 + ["/bytes/4099"] * 2
    run_py(web, LOOP, "127.0.0.1", *loop_paths)          # inside the pod: never on its veth
    entries = nginx.access_log_entries(expect=n_log + len(pod_paths) + len(loop_paths))[n_log:]
    settle(l7)
    truth = log_counts(entries)
    srv = series_for(l7, web, "server", 80)
    assert diff_counts(counts_by_request(srv), srv0) == truth
    assert diff_counts(counts_by_request(series_for(l7, client, "client", 80)), cli0) == log_counts(
        [e for e in entries if e["remote_addr"] == client.ipv4])
    # who counted what: the pod-to-pod requests come from packets (no process), the
    # loopback ones from syscalls (nginx named)
    by_path = {}
    for k, st in srv.items():
        by_path.setdefault((k.cgroup_id == 0, k.process), 0)
        by_path[(k.cgroup_id == 0, k.process)] += st.count
    assert by_path.get((False, "nginx"), 0) >= len(loop_paths)
    assert by_path.get((True, ""), 0) >= len(pod_paths)
    report = {c.signal: c.chosen for c in l7.attach_report()}
    assert report["l7_pod_traffic"].startswith("packets") and report["l7_other_traffic"].startswith("syscalls")
