"""The CLI's HTTP client for a running agent's REST API (httpx): one place that turns
connection failures and error answers into messages a person understands.

Place in the data flow: exporter/client/commands.py -> this module -> the agent's
exporter/api/app.py; JSON answers go to exporter/client/render.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import httpx

DEFAULT_SERVER = "http://127.0.0.1:9433"
SERVER_ENV = "MESHLENS_SERVER"
TOKEN_ENV = "MESHLENS_AUTH_TOKEN"


class ClientError(Exception):
    """A failure to show the user as one line (exit status 1)."""


def read_token(path: Optional[str]) -> Optional[str]:
    if path:
        try:
            lines = Path(path).read_text().strip().splitlines()
        except OSError as exc:
            raise ClientError(f"cannot read token file {path}: {exc.strerror}") from None
        return lines[0].strip() if lines else None
    return os.environ.get(TOKEN_ENV) or None


class AgentClient:
    def __init__(self, server: Optional[str] = None, token: Optional[str] = None, timeout: float = 10.0,
                 http: Optional[httpx.Client] = None) -> None:
        server = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # `http`: an already configured client (tests pass Starlette's TestClient)
        self._http = http or httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _params(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in params.items() if v is not None and v != ""}

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            detail = r.json().get("detail", r.text)
        except (ValueError, AttributeError):
            detail = r.text.strip()
        if r.status_code == 401:
            raise ClientError(f"the agent at {self.server} wants a bearer token: pass --token-file or set ${TOKEN_ENV}")
        raise ClientError(f"the agent answered {r.status_code}: {detail}")

    def _unreachable(self, exc: Exception) -> ClientError:
        return ClientError(f"cannot reach the meshlens agent at {self.server} ({type(exc).__name__}: {exc}); "
                           f"is `meshlens run` running there? (--server or ${SERVER_ENV} to choose another)")

    def get_json(self, path: str, **params: Any) -> Dict[str, Any]:
        try:
            r = self._http.get(path, params=self._params(params))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._check(r)
        return r.json()

    def get_text(self, path: str, **params: Any) -> str:
        try:
            r = self._http.get(path, params=self._params(params))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._check(r)
        return r.text

    def flows_all(self, max_records: int, **params: Any) -> Tuple[Dict[str, Any], list]:
        """Follow next_cursor until `max_records` flows are read; (first page's window, flows)."""
        out: list = []
        cursor = None
        window: Dict[str, Any] = {}
        while True:
            page = self.get_json("/api/v1/flows", cursor=cursor, limit=min(1000, max_records - len(out)), **params)
            window = window or page["window"]
            out.extend(page["flows"])
            cursor = page.get("next_cursor")
            if not cursor or len(out) >= max_records:
                return window, out

    def tap(self, **params: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """(event, data) from the SSE stream until it ends."""
        try:
            with self._http.stream("GET", "/api/v1/tap", params=self._params(params),
                                   timeout=httpx.Timeout(10.0, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        yield event, json.loads(line[5:].strip())
                    elif not line:
                        event = "message"
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
