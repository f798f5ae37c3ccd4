"""A three-tier chain for service-map tests: frontend -(HTTP)-> api -(TCP)-> db.

db:       accept connections; read --recv bytes, answer --send bytes, close. Runs forever.
api:      HTTP/1.1 server; for each request opens one connection to db (sends --db-send bytes,
          reads the answer), then answers 200, or 503 for paths starting with /fail.
frontend: --count requests over one keep-alive connection: the first --fail of them to
          /fail, the rest to /ok. Prints a JSON summary of the statuses it got.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def db(a: argparse.Namespace) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", a.port))
    ls.listen(128)
    print("listening", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            got = 0
            while got < a.recv:
                chunk = conn.recv(a.recv - got)
                if not chunk:
                    return
                got += len(chunk)
            conn.sendall(b"d" * a.send)

    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def api(a: argparse.Namespace) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            with socket.create_connection((a.db_host, a.db_port), timeout=10) as s:
                s.sendall(b"q" * a.db_send)
                while s.recv(65536):
                    pass
            status = 503 if self.path.startswith("/fail") else 200
            body = b"unavailable\n" if status == 503 else b"ok\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("0.0.0.0", a.port), Handler)
    print("listening", flush=True)
    srv.serve_forever()


def frontend(a: argparse.Namespace) -> None:
    conn = http.client.HTTPConnection(a.api_host, a.api_port, timeout=10)
    statuses: dict = {}
    for i in range(a.count):
        conn.request("GET", "/fail" if i < a.fail else f"/ok/{i}")
        resp = conn.getresponse()
        resp.read()
        statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
    conn.close()
    print(json.dumps(statuses), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["db", "api", "frontend"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--recv", type=int, default=0)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--db-host", default="")
    p.add_argument("--db-port", type=int, default=0)
    p.add_argument("--db-send", type=int, default=0)
    p.add_argument("--api-host", default="")
    p.add_argument("--api-port", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--fail", type=int, default=0)
    a = p.parse_args()
    {"db": db, "api": api, "frontend": frontend}[a.mode](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
