"""Smoke workload for the kernel matrix: the real agent against ground truth, on whatever
kernel runs it (the host's, or the 6.1 guest through vm.py), printed as one JSON report.

Reuses the integration helpers: pods (netns + veth + cgroup) from tests/integration/pods.py,
the agent process and its /metrics from agent_proc.py, exact TCP traffic from
tcp_workload.py, nginx from servers.py. Every section gives `truth` (what the workload,
nginx's access log or the pod's /proc/net/snmp say) and `meshlens` (the agent's /metrics,
filtered to the section's pods) with the same keys; tests/kernel_matrix/test_kernel_matrix.py
asserts they are equal. Sizes are odd and small: under TCG the whole run takes 2-3 minutes
with the agent start (Python and the BPF verifier run emulated).

    python -m tests.kernel_matrix.smoke [SECTION...]   # prints the JSON report; exit 1 on a mismatch
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List

from tests.integration.agent_proc import MESHLENS, AgentProcess
from tests.integration.pods import Node, Pod, cleanup_leftovers
from tests.integration.servers import Nginx

WORKLOAD = str(Path(__file__).resolve().parents[1] / "integration" / "tcp_workload.py")
Report = Dict[str, Any]

TCP_CONNECTIONS, TCP_UP, TCP_DOWN = 53, 4099, 613
# (path, times): statuses nginx answers with (servers.DEFAULT_LOCATIONS), body via sendfile for /bytes.
HTTP_REQUESTS = (("/status/200", 11), ("/status/404", 5), ("/status/503", 3), ("/status/204", 2),
                 ("/bytes/4099", 7))
REFUSED_CONNECTS = 7
BULK_BYTES, LOSS = 3_000_017, 0.10
# Reads with MSG_PEEK first, then one MSG_WAITALL read of a response sent in two parts.
PEEK_CONNECTIONS, PEEK_PARTS, PEEKED = 5, (1021, 2039), 64
WAIT_S = 60.0
AGENT_START_S = 240.0  # loading and verifying l7.bpf.o takes ~20 s under TCG

HTTP_CLIENT = r'''
import http.client, json, sys
host, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
c = http.client.HTTPConnection(host, port, timeout=30)
statuses = {}
for path, times in plan:
    for _ in range(times):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
c.close()
print(json.dumps(statuses))
'''


PEEK_SERVER = r'''
import socket, sys, time
port, count, parts = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port))
ls.listen(16)
print("listening", flush=True)
sent = 0
for _ in range(count):
    conn, _ = ls.accept()
    for i, n in enumerate(parts):
        if i:
            time.sleep(0.3)  # the second part comes later: MSG_WAITALL waits for it
        conn.sendall(b"p" * n)
        sent += n
    conn.close()
print(sent, flush=True)
'''

PEEK_CLIENT = r'''
import json, socket, sys
host, port, count, total, peek = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
got = peeked = 0
for _ in range(count):
    with socket.create_connection((host, port), timeout=30) as s:
        peeked += len(s.recv(peek, socket.MSG_PEEK))
        got += len(s.recv(total, socket.MSG_WAITALL))
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += len(b)
print(json.dumps({"received": got, "peeked": peeked}))
'''


def _json_out(pod: Pod, argv: List[str], timeout: float = 120) -> Any:
    return json.loads(pod.run(argv, timeout=timeout).stdout.strip().splitlines()[-1])


def _listener(pod: Pod, *args: str) -> subprocess.Popen:
    proc = pod.popen([sys.executable, WORKLOAD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "listening":
        raise RuntimeError(f"tcp_workload {args[0]} did not start: {proc.stderr.read()}")
    return proc


def _finish(proc: subprocess.Popen) -> Any:
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"tcp_workload failed: {err}")
    return json.loads(out.strip().splitlines()[-1])


def _of(pod: Pod) -> Dict[str, str]:
    return {"netns": str(pod.netns_inode), "cgroup": "/" + pod.cgroup_relpath}


class Scrape:
    """One /metrics scrape (under TCG a scrape costs about a second: read it once per poll)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.samples = agent.samples()

    def total(self, name: str, **match: str) -> int:
        return int(sum(s.value for s in self.samples if s.name == name
                       and all(s.labels.get(k) == v for k, v in match.items())))


def _settled(agent: AgentProcess, expected: Dict[str, Any], read: Callable[[Scrape], Dict[str, Any]]) -> Dict[str, Any]:
    """Poll the agent until it reports `expected` (or WAIT_S passes); return what it reported."""
    deadline = time.monotonic() + WAIT_S
    got = read(Scrape(agent))
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        got = read(Scrape(agent))
    return got


def tcp_section(node: Node, agent: AgentProcess) -> Report:
    srv, cli = node.add_pod("km-srv"), node.add_pod("km-cli")
    s0, c0 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
    server = _listener(srv, "server", "--host", "0.0.0.0", "--port", "8080", "--count", str(TCP_CONNECTIONS),
                       "--recv", str(TCP_UP), "--send", str(TCP_DOWN))
    client = _json_out(cli, [sys.executable, WORKLOAD, "client", "--host", srv.ipv4, "--port", "8080",
                             "--count", str(TCP_CONNECTIONS), "--send", str(TCP_UP)])
    served = _finish(server)
    s1, c1 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
    truth = {
        "outbound_opened": c1["ActiveOpens"] - c0["ActiveOpens"],
        "outbound_closed": client["connections"],
        "outbound_sent_bytes": client["sent"],
        "outbound_received_bytes": client["received"],
        "inbound_opened": s1["PassiveOpens"] - s0["PassiveOpens"],
        "inbound_closed": served["accepted"],
        "inbound_sent_bytes": served["sent"],
        "inbound_received_bytes": served["received"],
    }
    out = dict(**_of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8080")
    inb = dict(**_of(srv), direction="inbound", network_peer_address=cli.ipv4, server_port="8080")

    def read(m: Scrape) -> Dict[str, int]:
        got = {}
        for side, match in (("outbound", out), ("inbound", inb)):
            got[f"{side}_opened"] = m.total("meshlens_tcp_connections_opened_total", **match)
            got[f"{side}_closed"] = m.total("meshlens_tcp_connections_closed_total", **match)
            got[f"{side}_sent_bytes"] = m.total("meshlens_tcp_sent_bytes_total", **match)
            got[f"{side}_received_bytes"] = m.total("meshlens_tcp_received_bytes_total", **match)
        return got

    return {"workload": f"{TCP_CONNECTIONS} connections, {TCP_UP} bytes up, {TCP_DOWN} down",
            "truth": truth, "meshlens": _settled(agent, truth, read)}


def http_section(node: Node, agent: AgentProcess) -> Report:
    web, cli = node.add_pod("km-web"), node.add_pod("km-hcli")
    total = sum(n for _, n in HTTP_REQUESTS)
    with Nginx(web) as nginx:
        seen = _json_out(cli, [sys.executable, "-c", HTTP_CLIENT, web.ipv4, "80", json.dumps(HTTP_REQUESTS)])
        entries = [e for e in nginx.access_log_entries(expect=total, timeout=10) if e["server_port"] == 80]
    log_statuses = collections.Counter(str(e["status"]) for e in entries)
    truth: Dict[str, Any] = {
        "server_requests_by_status": dict(sorted(log_statuses.items())),
        "client_requests_by_status": dict(sorted(seen.items())),
        # nginx's $bytes_sent / $request_length: what went over the server's sockets
        # (headers + bodies; /bytes bodies through sendfile).
        "server_tcp_sent_bytes": sum(e["bytes_sent"] for e in entries),
        "server_tcp_received_bytes": sum(e["request_length"] for e in entries),
        # pod traffic is parsed from packets in `auto` (the agent's default): a series from the
        # packet path names no process, one from the syscall path does. All on the first.
        "server_requests_from_packets": len(entries),
        "client_requests_from_packets": sum(seen.values()),
    }

    def by_status(m: Scrape, name: str, match: Dict[str, str]) -> Dict[str, int]:
        counts: Dict[str, int] = collections.Counter()
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                counts[s.labels["http_response_status_code"]] += int(s.value)
        return dict(sorted((k, v) for k, v in counts.items() if v))

    inb = dict(**_of(web), direction="inbound", server_port="80")

    def read(m: Scrape) -> Dict[str, Any]:
        return {
            "server_requests_by_status": by_status(m, "http_server_request_duration_seconds_count",
                                                   {"netns": _of(web)["netns"], "server_port": "80"}),
            # the pod by its netns: on the packet path (--l7-source auto, pod traffic) a series
            # has no socket, hence no cgroup; each test pod has a network namespace of its own
            "client_requests_by_status": by_status(m, "http_client_request_duration_seconds_count",
                                                   {"netns": _of(cli)["netns"]}),
            "server_requests_from_packets": m.total("http_server_request_duration_seconds_count",
                                                    netns=_of(web)["netns"], server_port="80", process=""),
            "client_requests_from_packets": m.total("http_client_request_duration_seconds_count",
                                                    netns=_of(cli)["netns"], process=""),
            "server_tcp_sent_bytes": m.total("meshlens_tcp_sent_bytes_total", **inb),
            "server_tcp_received_bytes": m.total("meshlens_tcp_received_bytes_total", **inb),
        }

    return {"workload": f"{total} keep-alive requests to nginx: " + ", ".join(f"{n}x {p}" for p, n in HTTP_REQUESTS),
            "truth": truth, "meshlens": _settled(agent, truth, read)}


def retransmit_section(node: Node, agent: AgentProcess) -> Report:
    snd, rcv = node.add_pod("km-snd"), node.add_pod("km-rcv")
    rcv.drop_packets(LOSS, "ingress", match=("--dport", "5555"))
    s0 = snd.snmp()["Tcp"]
    sink = _listener(rcv, "sink", "--host", "0.0.0.0", "--port", "5555")
    _json_out(snd, [sys.executable, WORKLOAD, "bulk", "--host", rcv.ipv4, "--port", "5555",
                    "--send", str(BULK_BYTES)], timeout=300)
    received = _finish(sink)["received"]
    truth = {
        "sender_retransmitted_segments": snd.snmp()["Tcp"]["RetransSegs"] - s0["RetransSegs"],
        "sender_sent_bytes": BULK_BYTES,
        "receiver_received_bytes": received,
    }
    out = dict(**_of(snd), direction="outbound", network_peer_address=rcv.ipv4, server_port="5555")

    def read(m: Scrape) -> Dict[str, int]:
        return {
            "sender_retransmitted_segments": m.total("meshlens_tcp_retransmitted_segments_total", **_of(snd)),
            "sender_sent_bytes": m.total("meshlens_tcp_sent_bytes_total", **out),
            "receiver_received_bytes": m.total("meshlens_tcp_received_bytes_total", **_of(rcv),
                                                       direction="inbound"),
        }

    return {"workload": f"{BULK_BYTES} bytes on one connection, {LOSS:.0%} of the receiver's packets dropped",
            "truth": truth, "meshlens": _settled(agent, truth, read)}


def refused_section(node: Node, agent: AgentProcess) -> Report:
    srv, cli = node.add_pod("km-closed"), node.add_pod("km-knock")
    s0, c0 = srv.snmp()["Tcp"], cli.snmp()["Tcp"]
    outcomes = _json_out(cli, [sys.executable, WORKLOAD, "connect", "--host", srv.ipv4, "--port", "9",
                               "--count", str(REFUSED_CONNECTS)])
    truth = {
        "client_connect_refused": outcomes.get("ECONNREFUSED", 0),
        "client_attempt_fails": cli.snmp()["Tcp"]["AttemptFails"] - c0["AttemptFails"],
        "server_resets_sent": srv.snmp()["Tcp"]["OutRsts"] - s0["OutRsts"],
    }
    fails = dict(**_of(cli), direction="outbound", server_port="9")

    def read(m: Scrape) -> Dict[str, int]:
        refused = m.total("meshlens_tcp_connect_failures_total", reason="refused", **fails)
        return {
            "client_connect_refused": refused,
            "client_attempt_fails": m.total("meshlens_tcp_connect_failures_total", **fails),
            "server_resets_sent": m.total("meshlens_tcp_resets_sent_total", netns=str(srv.netns_inode),
                                                  network_peer_address=cli.ipv4, server_port="9"),
        }

    return {"workload": f"{REFUSED_CONNECTS} connects to a closed port",
            "truth": truth, "meshlens": _settled(agent, truth, read)}


def recv_flags_section(node: Node, agent: AgentProcess) -> Report:
    srv, cli = node.add_pod("km-psrv"), node.add_pod("km-pcli")
    total = sum(PEEK_PARTS)
    server = srv.popen([sys.executable, "-c", PEEK_SERVER, "8090", str(PEEK_CONNECTIONS),
                        ",".join(map(str, PEEK_PARTS))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "listening":
        raise RuntimeError(f"peek server did not start: {server.stderr.read()}")
    client = _json_out(cli, [sys.executable, "-c", PEEK_CLIENT, srv.ipv4, "8090", str(PEEK_CONNECTIONS),
                             str(total), str(PEEKED)])
    out, err = server.communicate(timeout=60)
    if server.returncode != 0:
        raise RuntimeError(f"peek server failed: {err}")
    truth = {"client_received_bytes": client["received"], "server_sent_bytes": int(out.strip().splitlines()[-1])}
    match = dict(**_of(cli), direction="outbound", network_peer_address=srv.ipv4, server_port="8090")

    def read(m: Scrape) -> Dict[str, int]:
        return {"client_received_bytes": m.total("meshlens_tcp_received_bytes_total", **match),
                "server_sent_bytes": m.total("meshlens_tcp_sent_bytes_total", **_of(srv), direction="inbound")}

    return {"workload": f"{PEEK_CONNECTIONS} connections: {PEEKED}-byte MSG_PEEK, then a MSG_WAITALL read of "
                        f"{total} bytes sent in parts {PEEK_PARTS}",
            "truth": truth, "meshlens": _settled(agent, truth, read)}


SECTIONS: Dict[str, Callable[[Node, AgentProcess], Report]] = {
    "tcp": tcp_section, "recv_flags": recv_flags_section, "http": http_section, "retransmits": retransmit_section, "refused": refused_section,
}


def meshlens_check() -> Report:
    """`meshlens check` as a user runs it: exit code, output, and the attach point per signal."""
    proc = subprocess.run([MESHLENS, "check"], capture_output=True, text=True, timeout=AGENT_START_S)
    return {"returncode": proc.returncode, "output": proc.stdout, "attach": attach_points(proc.stdout)}


def attach_points(check_output: str) -> Dict[str, str]:
    """'source/signal' -> 'variant [programs]' from the attach points section of `meshlens check`."""
    lines = check_output.split("attach points", 1)[-1].splitlines()
    out = {}
    for line in lines:
        if line[:2] in ("√ ", "× ", "‼ ") and ": " in line:
            name, _, rest = line[2:].partition(": ")
            out[name] = rest.split(" (not ", 1)[0]
    return out


def run(sections: Iterable[str] = tuple(SECTIONS)) -> Report:
    """`meshlens check`, then the agent with each section on a fresh simulated node: the report."""
    report: Report = {"kernel": os.uname().release, "sections": {}}
    started = time.monotonic()
    report["check"] = meshlens_check()
    report["check_seconds"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    agent = AgentProcess(sweep_interval=0.5).start(timeout=AGENT_START_S)
    try:
        report["agent_start_seconds"] = round(time.monotonic() - started, 1)
        for name in sections:
            with Node() as node:
                t0 = time.monotonic()
                report["sections"][name] = SECTIONS[name](node, agent)
                report["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
        report["agent_lost_events"] = Scrape(agent).total("meshlens_agent_events_lost_total")
    finally:
        report["agent_exit_code"] = agent.stop()
    left = cleanup_leftovers()
    if left:
        report["leftovers"] = left
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def mismatches(report: Report) -> List[str]:
    """Every section key where meshlens and the ground truth differ, and anything left behind."""
    bad = [] if report["check"]["returncode"] == 0 else [f"meshlens check failed:\n{report['check']['output']}"]
    bad += [f"{name}.{k}: truth {sec['truth'][k]!r}, meshlens {sec['meshlens'].get(k)!r}"
           for name, sec in report["sections"].items() for k in sec["truth"] if sec["truth"][k] != sec["meshlens"].get(k)]
    retrans = report["sections"].get("retransmits", {}).get("truth", {}).get("sender_retransmitted_segments")
    if retrans == 0:
        bad.append("retransmits: the loss rule forced no retransmits, so nothing was compared")
    if report.get("agent_exit_code"):
        bad.append(f"agent exited with {report['agent_exit_code']} on SIGTERM")
    if report.get("leftovers"):
        bad.append(f"left behind: {report['leftovers']}")
    return bad


def main() -> int:
    report = run(sys.argv[1:] or tuple(SECTIONS))
    print(json.dumps(report, indent=1, sort_keys=True))
    return 1 if mismatches(report) else 0


if __name__ == "__main__":
    sys.exit(main())
