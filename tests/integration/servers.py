"""Real servers and load tools for integration tests, started inside simulated pods.

Each server is a context manager with an idempotent `stop()` that kills its processes,
reaps them and removes its `tempfile.mkdtemp()` directory (config, logs, pid files, data).
Servers inside pods run through `Pod.popen`, so the kernel attributes their traffic to the
pod's netns and cgroup. Readiness is checked by looking for the listening socket in the
pod's /proc/net/{tcp,tcp6,udp,udp6}, never by sending a request, so servers' logs contain
only the tests' own traffic.

Ground truth comes from the tools themselves: nginx's access log, dnsmasq's query log,
iperf3's JSON report, wrk's `done()` summary, Prometheus' query API.
"""
from __future__ import annotations

import inspect
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from tests.integration.pods import Pod, read_thread_net, register_process, stop_process

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
DEFAULT_BYTE_SIZES = (1, 613, 4099, 100003)
S = TypeVar("S", bound="_Server")


# --------------------------------------------------------------------------- common helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host in the root netns right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening_ports(tables: Mapping[str, str], state: str) -> set[int]:
    ports: set[int] = set()
    for text in tables.values():
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _read_socket_tables(pod: Optional[Pod], proto: str) -> dict[str, str]:
    names = (proto, proto + "6")
    if pod is None:
        return {name: read_thread_net(name) for name in names}
    return {name: pod.in_netns(read_thread_net, name) for name in names}


def wait_listening(
    pod: Optional[Pod], port: int, proto: str = "tcp", timeout: float = 10.0,
    proc: Optional[subprocess.Popen] = None, log_path: Optional[str] = None,
) -> None:
    """Wait until a socket listens on port (any address) in the pod's netns (root if None).

    Raises RuntimeError early if `proc` exits, quoting the tail of `log_path`.
    """
    state = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in _listening_ports(_read_socket_tables(pod, proto), state):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {_tail(log_path)}")
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {proto}/{port} after {timeout}s: {_tail(log_path)}")


def _tail(path: Optional[str], size: int = 2000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as log_file:
        return log_file.read()[-size:]


class _Server:
    """Base: a temp dir, processes to kill, idempotent stop(), context manager."""

    def __init__(self, kind: str) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=f"meshlens-{kind}-")
        self.processes: list[subprocess.Popen] = []
        self._stopped = False

    def _path(self, *parts: str) -> str:
        return os.path.join(self.tmpdir, *parts)

    def _start(self, pod: Optional[Pod], argv: Sequence[str], log_name: str) -> subprocess.Popen:
        """Start argv (in pod, or in the root netns), stdout+stderr to a log file in tmpdir."""
        with open(self._path(log_name), "ab") as log_file:
            kwargs: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            if pod is None:
                proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
                register_process(proc)
            else:
                proc = pod.popen(argv, **kwargs)
        self.processes.append(proc)
        return proc

    def _start_or_stop(self, start: Callable[[], None]) -> None:
        try:
            start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate (then kill) every process, reap them, remove the temp dir. Never raises."""
        if self._stopped:
            return
        self._stopped = True
        for proc in reversed(self.processes):
            stop_process(proc, signal.SIGTERM, timeout=5.0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- nginx

UPSTREAM_SCRIPT = r'''
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: keep-alive off

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/delay" or path.startswith("/delay/"):
            ms = int(path[len("/delay/"):] or 50) if path != "/delay" else 50
            time.sleep(ms / 1000.0)
            self.reply(200, b"delayed %d ms\n" % ms)
        else:
            self.reply(404, b"not found\n")

    do_HEAD = do_GET

    def do_POST(self):
        data = self.body()
        if self.path.split("?")[0] == "/upload":
            self.reply(201, b"stored %d\n" % len(data))
        else:
            self.reply(200, data)

    do_PUT = do_POST

ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

LOG_FIELDS = (
    "remote_addr", "request_method", "request_uri", "status", "body_bytes_sent", "bytes_sent",
    "request_length", "request_time", "connection", "connection_requests",
    "remote_port", "server_addr", "server_port", "msec",
)
_INT_FIELDS = {"status", "body_bytes_sent", "bytes_sent", "request_length", "connection",
               "connection_requests", "remote_port", "server_port"}
_FLOAT_FIELDS = {"request_time", "msec"}

# @TMP@ is the server's temp dir, @UPSTREAM@ the Python upstream's host:port.
DEFAULT_LOCATIONS: dict[str, str] = {
    "= /status/200": 'return 200 "ok\\n";',
    "= /status/201": 'return 201 "created\\n";',
    "= /status/204": "return 204;",
    "= /status/301": "return 301 /status/200;",
    "= /status/404": "return 404;",
    "= /status/500": "return 500;",
    "= /status/503": "return 503;",
    "/delay": "proxy_pass http://@UPSTREAM@;",
    "~ ^/bytes/(\\d+)$": "alias @TMP@/bytes/$1.bin; default_type application/octet-stream;",
    "= /echo": "proxy_pass http://@UPSTREAM@;",
    "= /upload": "proxy_pass http://@UPSTREAM@;",
    "/static/": "alias @TMP@/static/;",
}


class Nginx(_Server):
    """nginx (master + 1 worker) in a pod on port (v4 and v6), with a 50 ms Python upstream.

    Default routes: /status/{200,201,204,301,404,500,503}; /delay (upstream sleeps 50 ms,
    /delay/<ms> sleeps ms); /bytes/<n> (exactly n body bytes for n in byte_sizes); /echo
    (POST/PUT, chunked too, answers 200 with the same body); /upload (100-continue capable,
    answers 201 "stored <n>"); /static/index.html (GET/HEAD). `locations` maps a location
    spec ("= /x", "~ regex", "/prefix") to its block body and replaces the defaults
    (start from `DEFAULT_LOCATIONS`); @TMP@ and @UPSTREAM@ are substituted.
    """

    def __init__(
        self,
        pod: Pod,
        port: int = 80,
        locations: Optional[Mapping[str, str]] = None,
        *,
        upstream_port: int = 8081,
        byte_sizes: Sequence[int] = DEFAULT_BYTE_SIZES,
        sendfile: bool = True,
        timeout: float = 10.0,
    ) -> None:
        super().__init__("nginx")
        self.pod = pod
        self.port = port
        self.upstream_port = upstream_port
        self.byte_sizes = tuple(byte_sizes)
        self.locations = dict(DEFAULT_LOCATIONS if locations is None else locations)
        self.sendfile = sendfile
        self.access_log = self._path("access.log")
        self.error_log = self._path("error.log")
        self._start_or_stop(lambda: self._launch(timeout))

    @property
    def url(self) -> str:
        """Base URL over the pod's IPv4 address."""
        return f"http://{self.pod.ipv4}:{self.port}"

    @property
    def url6(self) -> str:
        """Base URL over the pod's IPv6 address."""
        return f"http://[{self.pod.ipv6}]:{self.port}"

    def _launch(self, timeout: float) -> None:
        self._write_content()
        with open(self._path("nginx.conf"), "w") as conf:
            conf.write(self.config())
        upstream = self._start(self.pod, [sys.executable, "-c", UPSTREAM_SCRIPT, str(self.upstream_port)],
                               "upstream.log")
        wait_listening(self.pod, self.upstream_port, timeout=timeout, proc=upstream,
                       log_path=self._path("upstream.log"))
        proc = self._start(self.pod, ["nginx", "-p", self.tmpdir, "-c", self._path("nginx.conf"),
                                      "-e", self.error_log], "nginx.out")
        wait_listening(self.pod, self.port, timeout=timeout, proc=proc, log_path=self.error_log)

    def _write_content(self) -> None:
        os.makedirs(self._path("bytes"))
        os.makedirs(self._path("static"))
        for size in self.byte_sizes:
            with open(self._path("bytes", f"{size}.bin"), "wb") as blob:
                blob.write(_pattern(size))
        with open(self._path("static", "index.html"), "w") as index:
            index.write("<html><body>meshlens</body></html>\n")

    def config(self) -> str:
        """The nginx.conf text this server runs with."""
        tmp = self.tmpdir
        upstream = f"127.0.0.1:{self.upstream_port}"
        log_format = "\t".join("$" + field for field in LOG_FIELDS)
        locations = "\n".join(
            f"        location {spec} {{ {body.replace('@TMP@', tmp).replace('@UPSTREAM@', upstream)} }}"
            for spec, body in self.locations.items()
        )
        return f"""
user root root;
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 4096; }}
http {{
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile {"on" if self.sendfile else "off"};
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format meshlens '{log_format}';
    access_log {tmp}/access.log meshlens;
    server {{
        listen {self.port};
        listen [::]:{self.port} ipv6only=on;
        server_name _;
{locations}
    }}
}}
"""

    def access_log_entries(self, expect: Optional[int] = None, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Parsed access log lines, oldest first.

        nginx writes a line when it finalizes a request, which can be just after the client
        got its response: with `expect`, wait (up to timeout) until that many lines exist.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = parse_access_log(_read_text(self.access_log))
            if expect is None or len(entries) >= expect or time.monotonic() >= deadline:
                return entries
            time.sleep(0.02)


def _pattern(size: int) -> bytes:
    """size bytes of a recognisable, non-compressible-looking pattern."""
    unit = bytes(range(33, 127))
    return (unit * (size // len(unit) + 1))[:size]


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as text_file:
            return text_file.read()
    except FileNotFoundError:
        return ""


def parse_access_log(text: str) -> list[dict[str, Any]]:
    """Parse lines in the `meshlens` log_format (tab-separated LOG_FIELDS); skip partial lines."""
    entries: list[dict[str, Any]] = []
    for line in text.split("\n"):
        values = line.split("\t")
        if len(values) != len(LOG_FIELDS):
            continue
        entry: dict[str, Any] = {}
        for field, value in zip(LOG_FIELDS, values):
            if field in _INT_FIELDS:
                entry[field] = int(value) if value.isdigit() else value
            elif field in _FLOAT_FIELDS:
                entry[field] = float(value)
            else:
                entry[field] = value
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- curl


def curl(pod: Pod, url: str, *args: str, timeout: float = 10.0) -> dict[str, Any]:
    """Run curl in the pod (body discarded); return curl's `-w %{json}` report.

    E.g. result["http_code"], result["size_download"] (body bytes), result["time_total"].
    """
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), "-w", "%{json}", *args, url]
    return json.loads(pod.run(argv, timeout=timeout + 5).stdout)


# --------------------------------------------------------------------------- dnsmasq


class Dnsmasq(_Server):
    """dnsmasq in a pod answering A/AAAA for `records` ({name: [addresses]}), no upstream.

    Every domain is local (`--local=/#/`), so any other name gets NXDOMAIN rather than
    REFUSED; a name with only A records answers AAAA with NOERROR and no answer (NODATA).
    Answers carry the AA flag. Queries are logged to `log_path` (see query_log()).
    """

    def __init__(
        self, pod: Pod, records: Mapping[str, Sequence[str]], *, port: int = 53, timeout: float = 10.0,
        log_extra: bool = False,
    ) -> None:
        """log_extra: `--log-queries=extra`, every line prefixed with the query's serial number
        and the client's address/port (e.g. `4 10.0.0.2/47653 config b.test is fd00::1`)."""
        super().__init__("dnsmasq")
        self.pod = pod
        self.log_extra = log_extra
        self.port = port
        self.records = {name: list(addrs) for name, addrs in records.items()}
        self.log_path = self._path("dnsmasq.log")
        self._start_or_stop(lambda: self._launch(timeout))

    def argv(self) -> list[str]:
        """dnsmasq's command line."""
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--user=root", "--group=root", f"--pid-file={self._path('dnsmasq.pid')}",
            f"--port={self.port}", "--bind-interfaces",
            f"--listen-address={self.pod.ipv4},127.0.0.1,{self.pod.ipv6},::1",
            "--log-queries=extra" if self.log_extra else "--log-queries", f"--log-facility={self.log_path}",
            "--local=/#/",
        ]
        for name, addrs in self.records.items():
            argv += [f"--host-record={name},{addr}" for addr in addrs]
        return argv

    def _launch(self, timeout: float) -> None:
        proc = self._start(self.pod, self.argv(), "dnsmasq.out")
        wait_listening(self.pod, self.port, proto="udp", timeout=timeout, proc=proc,
                       log_path=self._path("dnsmasq.out"))
        wait_listening(self.pod, self.port, proto="tcp", timeout=timeout, proc=proc,
                       log_path=self._path("dnsmasq.out"))

    def query_log(self) -> list[str]:
        """The 'query[...]' lines dnsmasq logged."""
        return [line for line in _read_text(self.log_path).splitlines() if "query[" in line]

    def log_lines(self) -> list[str]:
        """Every line dnsmasq logged (queries and what it answered)."""
        return _read_text(self.log_path).splitlines()


QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def build_dns_query(name: str, qtype: str = "A", query_id: Optional[int] = None) -> bytes:
    """A standard recursive-desired DNS query for name/qtype, class IN."""
    qid = secrets.randbelow(0x10000) if query_id is None else query_id
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split(".") if part)
    return header + labels + b"\x00" + struct.pack("!HH", QTYPES[qtype], 1)


def _skip_name(msg: bytes, offset: int) -> int:
    while True:
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def parse_dns_response(msg: bytes) -> dict[str, Any]:
    """id, rcode (name), aa flag, and A/AAAA answers (text) of a DNS response."""
    qid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", msg[:12])
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(msg, offset) + 4
    answers: list[str] = []
    for _ in range(ancount):
        offset = _skip_name(msg, offset)
        rtype, _, _, rdlength = struct.unpack("!HHIH", msg[offset:offset + 10])
        rdata = msg[offset + 10:offset + 10 + rdlength]
        offset += 10 + rdlength
        if rtype == 1:
            answers.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28:
            answers.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return {"id": qid, "rcode": RCODES.get(flags & 0xF, str(flags & 0xF)), "aa": bool(flags & 0x0400),
            "answers": answers, "ancount": ancount}


def _dns_client_main(server: str, port: int, name: str, qtype: str, timeout: float) -> None:
    """Body of the in-pod DNS client: one UDP query, the parsed reply printed as JSON."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(build_dns_query(name, qtype), (server, port))
        reply = sock.recv(65535)
    print(json.dumps(parse_dns_response(reply)))


def _dns_client_script() -> str:
    """A standalone script (no imports of this package: fast start) that runs _dns_client_main."""
    header = "from __future__ import annotations\nimport json, secrets, socket, struct, sys\n" \
             "from typing import Any, Optional\n"
    consts = f"QTYPES = {QTYPES!r}\nRCODES = {RCODES!r}\n"
    funcs = [build_dns_query, _skip_name, parse_dns_response, _dns_client_main]
    main = "_dns_client_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]))\n"
    return header + consts + "\n".join(inspect.getsource(f) for f in funcs) + main


def dns_query(pod: Pod, server: str, name: str, qtype: str = "A", port: int = 53,
              timeout: float = 2.0) -> dict[str, Any]:
    """Send one UDP DNS query from a process inside pod; return parse_dns_response()."""
    argv = [sys.executable, "-c", _dns_client_script(), server, str(port), name, qtype, str(timeout)]
    return json.loads(pod.run(argv, timeout=timeout + 10).stdout)


# --------------------------------------------------------------------------- Prometheus


class Prometheus(_Server):
    """Prometheus in the root netns on a free 127.0.0.1 port scraping `targets` (host:port)."""

    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s", *,
                 metrics_path: str = "/metrics", timeout: float = 30.0, agent_mode: bool = False,
                 remote_write_url: Optional[str] = None, remote_write_receiver: bool = False) -> None:
        """agent_mode: scrape and forward only (no TSDB, no queries); remote_write_url: send
        every sample there; remote_write_receiver: accept remote-write on /api/v1/write."""
        super().__init__("prometheus")
        self.agent_mode = agent_mode
        self.remote_write_url = remote_write_url
        self.remote_write_receiver = remote_write_receiver
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start_or_stop(lambda: self._launch(timeout))

    def config(self) -> dict[str, Any]:
        """The configuration (JSON is valid YAML)."""
        conf: dict[str, Any] = {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": "meshlens-test", "metrics_path": self.metrics_path,
                                "static_configs": [{"targets": self.targets}]}] if self.targets else [],
        }
        if self.remote_write_url:
            conf["remote_write"] = [{"url": self.remote_write_url,
                                     "queue_config": {"batch_send_deadline": "1s", "max_backoff": "1s"}}]
        return conf

    def _launch(self, timeout: float) -> None:
        with open(self._path("prometheus.yml"), "w") as conf:
            json.dump(self.config(), conf)
        storage = ([f"--enable-feature=agent", f"--storage.agent.path={self._path('data')}"] if self.agent_mode
                   else [f"--storage.tsdb.path={self._path('data')}"])
        receiver = ["--web.enable-remote-write-receiver"] if self.remote_write_receiver else []
        proc = self._start(None, [
            "prometheus", f"--config.file={self._path('prometheus.yml')}", *storage, *receiver,
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], "prometheus.log")
        deadline = time.monotonic() + timeout
        while not self._ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready: {_tail(self._path('prometheus.log'))}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through /api/v1/query; the `result` list (each has metric and value)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return list(body["data"]["result"])

    def wait_for(self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll query(expr) until predicate(result) holds; return that result or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} never satisfied the predicate; last result {result}")


# --------------------------------------------------------------------------- iperf3


class Iperf3Server(_Server):
    """`iperf3 -s` in a pod on port (dual-stack)."""

    def __init__(self, pod: Pod, port: int = 5201, timeout: float = 10.0) -> None:
        super().__init__("iperf3")
        self.pod = pod
        self.port = port
        self._start_or_stop(lambda: self._launch(timeout))

    def _launch(self, timeout: float) -> None:
        proc = self._start(self.pod, ["iperf3", "-s", "-p", str(self.port)], "iperf3.log")
        wait_listening(self.pod, self.port, timeout=timeout, proc=proc, log_path=self._path("iperf3.log"))


def run_iperf3(
    pod: Pod, server_ip: str, port: int = 5201, *, bytes: Optional[int] = None,
    seconds: Optional[float] = None, json: bool = True, cport: Optional[int] = None,
    reverse: bool = False, extra_args: Sequence[str] = (), timeout: float = 120.0,
) -> dict[str, Any]:
    """Run an iperf3 client in pod; return sent_bytes, received_bytes, retransmits, seconds, report.

    With bytes=N iperf3 sends whole blocks (128 KiB by default), so it may send a little
    more than N: sent_bytes is what it actually sent. cport pins the data stream's client
    port (the control connection keeps an ephemeral one). json=False returns {"text": ...}.
    """
    argv = ["iperf3", "-c", server_ip, "-p", str(port)]
    if bytes is not None:
        argv += ["-n", str(bytes)]
    if seconds is not None:
        argv += ["-t", str(seconds)]
    if cport is not None:
        argv += ["--cport", str(cport)]
    if reverse:
        argv.append("-R")
    argv += list(extra_args)
    if not json:
        return {"text": pod.run(argv, timeout=timeout).stdout}
    report = _json_loads(pod.run(argv + ["-J"], timeout=timeout, check=False).stdout)
    if "error" in report:
        raise RuntimeError(f"iperf3 failed: {report['error']}")
    end = report["end"]
    return {
        "sent_bytes": int(end["sum_sent"]["bytes"]),
        "received_bytes": int(end["sum_received"]["bytes"]),
        "retransmits": int(end["sum_sent"].get("retransmits", 0)),
        "seconds": float(end["sum_sent"]["seconds"]),
        "report": report,
    }


_json_loads = json.loads  # run_iperf3's `json` parameter shadows the module


# --------------------------------------------------------------------------- wrk

WRK_DONE_LUA = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MESHLENS_WRK {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"errors\":{\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
    "\"latency_us\":{\"min\":%d,\"max\":%d,\"mean\":%.3f,\"stdev\":%.3f," ..
    "\"p50\":%d,\"p75\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d}}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
'''


def run_wrk(
    pod: Pod, url: str, connections: int, duration_s: int, threads: int = 1,
    script: Optional[str] = None, extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run wrk in pod; return requests, duration_us, bytes, errors, latency_us percentiles, rps.

    duration_s is whole seconds (wrk's limit). `script` is Lua source run before the
    JSON-printing done() (it must not define done itself).
    """
    if threads > connections:
        raise ValueError("wrk needs connections >= threads")
    tmpdir = tempfile.mkdtemp(prefix="meshlens-wrk-")
    try:
        lua = os.path.join(tmpdir, "meshlens.lua")
        with open(lua, "w") as lua_file:
            lua_file.write((script or "") + "\n" + WRK_DONE_LUA)
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(duration_s)}s",
                "--latency", "-s", lua, *extra_args, url]
        out = pod.run(argv, timeout=duration_s + 60).stdout
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    line = next((l for l in out.splitlines() if l.startswith("MESHLENS_WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out}")
    result = _json_loads(line.split(" ", 1)[1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6) if result["duration_us"] else 0.0
    result["text"] = out
    return result
