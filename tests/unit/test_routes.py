"""Route templating: examples, and properties (never raises, never beyond the cap)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.agent.sources.l7.routes import OVERFLOW_ROUTE, UNKNOWN_ROUTE, RouteConfig, RouteTable, template


def test_examples() -> None:
    assert template("/users/123") == "/users/{id}"
    assert template("/users/123/orders/9?x=1") == "/users/{id}/orders/{id}"
    assert template("/o/3fa85f64-5717-4562-b3fc-2c963f66afa6") == "/o/{uuid}"
    assert template("/blob/deadbeef01") == "/blob/{hex}"
    assert template("/t/" + "aZ9_" * 7) == "/t/{token}"
    assert template("/v1/users") == "/v1/users"           # short mixed segments stay
    assert template("/static/index.html#top") == "/static/index.html"
    assert template("/") == "/"
    assert template("*") == "*"
    assert template("http://example.com/a/1") == "/a/{id}"
    assert template("/" + "a/" * 40).endswith("{rest}")


def test_configured_patterns_win() -> None:
    t = RouteTable(RouteConfig(patterns=[(r"^/files/.+$", "/files/{path}")]))
    t.learn_path(1, b"/files/a/b/c.txt")
    assert t.route("w", 1) == "/files/{path}"


def test_unknown_path_id_is_not_cached() -> None:
    t = RouteTable()
    assert t.route("w", 7) == UNKNOWN_ROUTE
    t.learn_path(7, b"/late/1")
    assert t.route("w", 7) == "/late/{id}"


def test_cap_per_workload_with_overflow() -> None:
    t = RouteTable(RouteConfig(max_routes=3))
    for i, p in enumerate(["/a", "/b", "/c", "/d", "/e"]):
        t.learn_path(i, p)
    assert [t.route("w1", i) for i in range(5)] == ["/a", "/b", "/c", OVERFLOW_ROUTE, OVERFLOW_ROUTE]
    assert t.overflowed == 2
    assert t.route("w2", 4) == "/e"                       # the cap is per workload
    assert len(t.routes("w1")) == 3


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_template_never_raises_and_is_stable(path: str) -> None:
    r = template(path)
    assert isinstance(r, str) and r
    assert template(r) == r or "{" in r or r == "*" or not path.startswith("/")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=200)), max_size=200),
       st.integers(1, 20))
def test_route_table_stays_within_cap(paths, cap) -> None:
    t = RouteTable(RouteConfig(max_routes=cap), max_paths=50)
    for pid, text in paths:
        t.learn_path(pid, text)
        r = t.route("w", pid)
        assert isinstance(r, str)
    assert len(t.routes("w")) <= cap
