"""Route templating: URL path -> low-cardinality `http.route` label, with a per-workload cap.

The kernel hashes each request's path prefix (query string dropped) to a path id and sends
the text of every new id once (agent/sources/l7/http.py receives it). This module turns that text
into a route template (`/users/123` -> `/users/{id}`) and bounds how many distinct routes a
workload can have: past the cap, new routes map to OVERFLOW_ROUTE and are counted. Nothing
here can grow without bound or raise on hostile input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Optional, Pattern, Sequence, Tuple

OVERFLOW_ROUTE = "__overflow__"
UNKNOWN_ROUTE = "__unknown__"   # a path id whose text never reached user space
MAX_PATH_CHARS = 256
MAX_SEGMENTS = 16

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NUMBER = re.compile(r"^[0-9]+$")
_HEX = re.compile(r"^[0-9a-fA-F\-]{8,}$")
_HEXISH_DIGITS = re.compile(r"[0-9]")
_LONG_TOKEN = re.compile(r"^[A-Za-z0-9_\-=]{24,}$")  # base64-ish ids, tokens, hashes

# Default segment rules, tried in order: (pattern, placeholder).
DEFAULT_SEGMENT_RULES: Tuple[Tuple[Pattern[str], str], ...] = (
    (_NUMBER, "{id}"),
    (_UUID, "{uuid}"),
)


@dataclass
class RouteConfig:
    """max_routes: distinct routes per workload; patterns: (regex, template) applied to the
    whole path first, e.g. (r"^/api/v1/users/[^/]+/avatar$", "/api/v1/users/{name}/avatar")."""

    max_routes: int = 200
    patterns: Sequence[Tuple[str, str]] = ()
    max_segments: int = MAX_SEGMENTS


def _segment(seg: str) -> str:
    """Placeholder classes match l7.bpf.c's end_segment(): every segment the kernel hashes as
    an id becomes a placeholder here too (the kernel groups paths by them)."""
    if not seg:
        return seg
    if _NUMBER.match(seg):
        return "{id}"
    if _UUID.match(seg):
        return "{uuid}"
    if _HEX.match(seg) and _HEXISH_DIGITS.search(seg):
        return "{hex}"
    if _LONG_TOKEN.match(seg) and _HEXISH_DIGITS.search(seg):
        return "{token}"
    return seg


def template(path: str, patterns: Sequence[Tuple[Pattern[str], str]] = (), max_segments: int = MAX_SEGMENTS) -> str:
    """Template one path. Query and fragment are dropped; never raises for a str."""
    path = path[:MAX_PATH_CHARS]
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if not path.startswith("/"):
        # absolute-form (proxy requests) or garbage: keep only the path part of a URL
        m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://[^/]*(/.*)?$", path)
        if m:
            path = m.group(1) or "/"
        elif path == "*":
            return "*"
        else:
            return "/" + _segment(path) if path else "/"
    for rx, tmpl in patterns:
        if rx.match(path):
            return tmpl
    segs = path.split("/")[1:]
    if len(segs) > max_segments:
        segs = segs[:max_segments] + ["{rest}"]
    return "/" + "/".join(_segment(s) for s in segs)


@dataclass
class _Workload:
    routes: Dict[str, None] = field(default_factory=dict)


class RouteTable:
    """path id -> path text (from the kernel), and (workload, path id) -> route with a cap.

    `workload` is any hashable naming the local workload (cgroup id today, a pod later).
    """

    def __init__(self, config: Optional[RouteConfig] = None, max_paths: int = 100_000) -> None:
        self.config = config or RouteConfig()
        self._patterns = [(re.compile(rx), t) for rx, t in self.config.patterns]
        self._paths: Dict[int, str] = {}
        self._max_paths = max_paths
        self._workloads: Dict[Hashable, _Workload] = {}
        self._cache: Dict[Tuple[Hashable, int], str] = {}
        self.overflowed = 0          # requests' routes folded into OVERFLOW_ROUTE (per new mapping)
        self.unknown_paths = 0

    def learn_path(self, path_id: int, text: bytes | str) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if len(self._paths) >= self._max_paths and path_id not in self._paths:
            self._paths.clear()      # bounded: a flood of distinct paths restarts the table
            self._cache.clear()
        self._paths[path_id] = text

    def path(self, path_id: int) -> Optional[str]:
        return self._paths.get(path_id)

    def route(self, workload: Hashable, path_id: int) -> str:
        cached = self._cache.get((workload, path_id))
        if cached is not None:
            return cached
        text = self._paths.get(path_id)
        if text is None:
            self.unknown_paths += 1
            return UNKNOWN_ROUTE   # not cached: the text may still arrive
        r = self.route_for_text(workload, text)
        if len(self._cache) >= self._max_paths:
            self._cache.clear()
        self._cache[(workload, path_id)] = r
        return r

    def route_for_text(self, workload: Hashable, text: str) -> str:
        r = template(text, self._patterns, self.config.max_segments)
        w = self._workloads.setdefault(workload, _Workload())
        if r in w.routes:
            return r
        if len(w.routes) >= self.config.max_routes:
            self.overflowed += 1
            return OVERFLOW_ROUTE
        w.routes[r] = None
        return r

    def routes(self, workload: Hashable) -> List[str]:
        w = self._workloads.get(workload)
        return list(w.routes) if w else []

    def forget_workloads(self, alive: Iterable[Hashable]) -> None:
        keep = set(alive)
        for k in [k for k in self._workloads if k not in keep]:
            del self._workloads[k]
        self._cache = {k: v for k, v in self._cache.items() if k[0] in keep}
