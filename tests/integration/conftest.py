"""pytest wiring for integration tests: root check, a `node` per test, a leftovers check.

Every test under tests/integration is skipped (with the reason) when not run as root.
The `node` fixture yields a fresh simulated node and always closes it. At the end of the
session, anything this process created and did not remove (netns, links, cgroup dirs,
processes) is cleaned up and the session fails loudly, naming each leftover.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.pods import Node, cleanup_leftovers, leftovers

ROOT_REASON = "integration tests need root: network namespaces, veths, bridges, cgroups, iptables"
HERE = Path(__file__).resolve().parent

log = logging.getLogger(__name__)


def _is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every integration item as skipped when not root."""
    if _is_root():
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Warn about stale objects from earlier runs; fail the session on this run's leftovers."""
    stale = leftovers(everything=True) if _is_root() else []
    if stale:
        log.warning("found before this session (not ours to remove): %s", stale)
    yield
    if not _is_root():
        return
    found = cleanup_leftovers()
    if found:
        pytest.fail("integration tests left behind (now removed): " + "; ".join(found), pytrace=False)


@pytest.fixture
def node() -> Iterator[Node]:
    """A fresh simulated node (bridge + subnets); closed, with its pods, after the test."""
    sim = Node()
    try:
        yield sim
    finally:
        sim.close()
