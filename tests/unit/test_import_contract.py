"""The import rule of docs/architecture.md (.importlinter): kept by the tree as it is, and
really enforced: the same contracts run on a copy of the tree with one forbidden import
added each report that import as broken."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(tree: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_tree_keeps_every_contract() -> None:
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


@pytest.mark.parametrize(
    "module, bad_import, contract",
    [
        ("agent/sources/tcp/source.py", "from meshlens.agent.aggregate import flows", "Data flow"),
        ("agent/kernel/bpf.py", "from meshlens.agent.sources.tcp import structs", "Data flow"),
        ("agent/identity/resolver.py", "from meshlens.agent.sources.tc import link_watch", "Data flow"),
        ("agent/runner.py", "from meshlens.exporter.prometheus import collector", "Nothing under agent/"),
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, bad_import: str, contract: str) -> None:
    pkg = tmp_path / "meshlens"
    for top in ("agent", "exporter"):
        shutil.copytree(REPO / top, pkg / top, ignore=shutil.ignore_patterns("__pycache__", "bpfobj"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    with open(pkg / module, "a") as f:
        f.write(f"\n{bad_import}  # added by the test\n")
    res = _lint(tmp_path, pythonpath=str(tmp_path))
    assert res.returncode != 0, res.stdout
    broken = res.stdout[res.stdout.index("Broken contracts"):]
    assert contract in broken
    offender = module[:-3].replace("/", ".")
    assert f"meshlens.{offender} ->" in broken.replace("\n", " "), broken
