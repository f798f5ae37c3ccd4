"""cgroup_skb series name the process again: the cgroup/sock_create program keeps each socket's
creator (accepted sockets inherit the listener's), checked against the kernel's own word for
the names (/proc/PID/comm, `ss -p`) and the request counts against nginx's access log."""
from __future__ import annotations

import collections
import re
import subprocess
import sys
import textwrap
from typing import Dict, Iterator

import pytest

from meshlens.agent.sources.l7.cgroup import OLD_SOCKS_PROGRAM, OWNERS_PROGRAM, SOCK_PROGRAM
from meshlens.agent.sources.l7.select import BothHttpSource
from tests.integration.l7_helpers import log_counts, settle, started_source
from tests.integration.servers import Nginx, free_port
from tests.integration.test_l7_auto import HOST_NETNS, host_run, host_series, my_cgroup_id

# The client prints its own name as the kernel has it, then makes its requests.
CLIENT = "import http.client, sys\nprint(open('/proc/self/comm').read().strip(), flush=True)\n" \
         "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))\n" \
         "for p in sys.argv[3:]:\n    c.request('GET', p); c.getresponse().read()\n"


@pytest.fixture(scope="module")
def l7() -> Iterator[BothHttpSource]:
    yield from started_source("auto")


def by_process(series) -> Dict[str, int]:
    out: Dict[str, int] = collections.Counter()
    for k, st in series.items():
        out[k.process] += st.count
    return dict(out)


def diff(now: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {p: n - before.get(p, 0) for p, n in now.items() if n - before.get(p, 0)}


def listener_comm(port: int) -> str:
    """The name of the process listening on `port`, as `ss -p` reads it from the kernel."""
    out = host_run("ss", "-Hltnp", f"sport = :{port}")
    names = set(re.findall(r'\(\("([^"]+)",pid=', out))
    assert len(names) == 1, out
    return names.pop()


def test_sock_create_attached(l7) -> None:
    report = {c.signal: c for c in l7.attach_report()}
    assert report["l7_process"].chosen and report["l7_process"].chosen.startswith("cgroup/sock_create")
    assert report["l7_process"].programs == [SOCK_PROGRAM, OWNERS_PROGRAM, OLD_SOCKS_PROGRAM]


def test_host_nginx_and_clients_named(l7) -> None:
    """nginx (its sockets all accepted from a listener) and two clients, python and curl, on
    host loopback: each side's series carry the exact name, every request counted."""
    with Nginx(None, free_port()) as nginx:  # type: ignore[arg-type]
        port = nginx.port
        nginx_comm = listener_comm(port)
        srv0, cli0 = by_process(host_series(l7, "server", port)), by_process(host_series(l7, "client", port))
        n_log = len(nginx.access_log_entries())
        py_paths = ["/status/200"] * 7 + ["/bytes/4099"] * 4
        py_comm = host_run(sys.executable, "-c", CLIENT, "127.0.0.1", str(port), *py_paths).strip()
        curl_n = 5
        host_run("curl", "-sS", "-o", "/dev/null", *[f"http://127.0.0.1:{port}/status/201"] * curl_n)
        entries = nginx.access_log_entries(expect=n_log + len(py_paths) + curl_n)[n_log:]
        settle(l7)
        total = sum(log_counts(entries, port).values())
        assert total == len(py_paths) + curl_n
        assert diff(by_process(host_series(l7, "server", port)), srv0) == {nginx_comm: total}
        assert diff(by_process(host_series(l7, "client", port, "127.0.0.1")), cli0) == {py_comm: len(py_paths),
                                                                                        "curl": curl_n}
        assert nginx_comm == "nginx" and py_comm.startswith("python")


# A server whose listener is made under one name and whose connections are accepted under
# another (prctl PR_SET_NAME between the two): the accepted socket carries the listener's name.
SERVER = textwrap.dedent("""
    import ctypes, socket, sys
    libc = ctypes.CDLL(None)
    libc.prctl(15, b"ml-listen", 0, 0, 0)
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0)); ls.listen(4)
    libc.prctl(15, b"ml-accept", 0, 0, 0)
    print(ls.getsockname()[1], flush=True)
    n = int(sys.argv[1])
    c, _ = ls.accept()
    f = c.makefile("rb")
    for _ in range(n):
        while f.readline() not in (b"\\r\\n", b""):
            pass
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nabc")
    c.close()
    print(open("/proc/self/comm").read().strip(), flush=True)
""")


def test_accepted_socket_inherits_listener_name(l7) -> None:
    n = 13
    srv = subprocess.Popen([sys.executable, "-c", SERVER, str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        host_run(sys.executable, "-c", CLIENT, "127.0.0.1", str(port), *["/x"] * n)
        accepting = srv.stdout.readline().strip()
        assert srv.wait(timeout=30) == 0
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    settle(l7)
    assert accepting == "ml-accept"   # the task that accepted and served had renamed itself
    assert by_process(host_series(l7, "server", port)) == {"ml-listen": n}
    # the series are in the host netns and this test's cgroup (host_series filters on both)
    assert all(k.netns == HOST_NETNS and k.cgroup_id == my_cgroup_id() for k in host_series(l7, "server", port))


# A keep-alive client that makes its connection (and a first request) before the agent starts,
# then waits to be told to go on with the rest on the same connection.
OLD_CLIENT = textwrap.dedent("""
    import http.client, sys
    c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
    c.request("GET", "/status/200"); c.getresponse().read()
    print(open("/proc/self/comm").read().strip(), flush=True)
    sys.stdin.readline()
    for _ in range(int(sys.argv[3])):
        c.request("GET", "/bytes/4099"); c.getresponse().read()
    print("done", flush=True)
""")


def test_sockets_older_than_the_agent_are_named() -> None:
    """An agent that starts after the server and after a client's keep-alive connection (a
    DaemonSet rollout on a busy node): sock_create never saw those sockets, so the start-up
    pass names them from their holders. The old connection's requests, both sides, and a new
    connection accepted from the old listener carry the names `ss -p` and /proc give."""
    with Nginx(None, free_port()) as nginx:  # type: ignore[arg-type]
        port = nginx.port
        nginx_comm = listener_comm(port)
        n_old, n_curl = 9, 5
        proc = subprocess.Popen([sys.executable, "-c", OLD_CLIENT, "127.0.0.1", str(port), str(n_old)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            py_comm = proc.stdout.readline().strip()   # type: ignore[union-attr]
            n_log = len(nginx.access_log_entries(expect=1))
            gen = started_source("auto")
            late = next(gen)
            try:
                assert isinstance(late, BothHttpSource)
                assert late.cgroup.old_socks_refused is None
                # at least nginx's listener, its accepted socket and the client's
                assert late.cgroup.old_socks_named >= 3, late.cgroup.old_socks_named
                proc.stdin.write("go\n")   # type: ignore[union-attr]
                proc.stdin.flush()         # type: ignore[union-attr]
                assert proc.stdout.readline().strip() == "done"   # type: ignore[union-attr]
                host_run("curl", "-sS", "-o", "/dev/null", *[f"http://127.0.0.1:{port}/status/201"] * n_curl)
                entries = nginx.access_log_entries(expect=n_log + n_old + n_curl)[n_log:]
                settle(late)
                assert sum(log_counts(entries, port).values()) == n_old + n_curl
                assert by_process(host_series(late, "server", port)) == {nginx_comm: n_old + n_curl}
                assert by_process(host_series(late, "client", port, "127.0.0.1")) == {py_comm: n_old, "curl": n_curl}
                assert nginx_comm == "nginx" and py_comm.startswith("python")
            finally:
                gen.close()
        finally:
            proc.kill()
            proc.wait()
