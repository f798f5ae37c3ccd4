"""Formats smoke reports (smoke.py) of several kernels side by side: attach points from
`meshlens check`, then every compared count as truth/meshlens per kernel. Written by
test_kernel_matrix.py to .build/kernel-matrix.txt for the record."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

Report = Dict[str, Any]


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]


def _count(truth: Any, seen: Any) -> str:
    mark = "=" if truth == seen else "≠"
    if isinstance(truth, dict):
        return " ".join(f"{k}:{v}" for k, v in truth.items()) + ("" if truth == seen else f" {mark} {seen}")
    return f"{truth}" if truth == seen else f"{truth} {mark} {seen}"


def render(reports: Dict[str, Report]) -> str:
    """Text with one column per kernel (label -> report)."""
    labels = list(reports)
    kernels = [f"{label} ({reports[label]['kernel']})" for label in labels]
    out = ["meshlens check: attach points", ""]
    signals = sorted({s for r in reports.values() for s in r["check"]["attach"]})
    out += _table(["signal", *kernels],
                  [[s, *(reports[l]["check"]["attach"].get(s, "-") for l in labels)] for s in signals])
    out += ["", "check exit codes: " + ", ".join(f"{l} {reports[l]['check']['returncode']}" for l in labels), ""]
    out += ["smoke workload: ground truth (= meshlens agrees; ≠ shows meshlens' value)", ""]
    rows: List[Sequence[str]] = []
    sections = [s for s in reports[labels[0]]["sections"]]
    for sec in sections:
        first = reports[labels[0]]["sections"][sec]
        rows.append([f"{sec}: {first['workload']}",
                     *(f"({reports[l]['sections'][sec].get('seconds', '?')} s)" for l in labels)])
        for key in first["truth"]:
            rows.append([f"  {key}", *(_count(reports[l]["sections"][sec]["truth"].get(key),
                                              reports[l]["sections"][sec]["meshlens"].get(key)) for l in labels)])
    out += _table(["", *kernels], rows)
    out += ["", "seconds (check, agent start, whole smoke): " + "; ".join(
        f"{l} {reports[l]['check_seconds']}, {reports[l]['agent_start_seconds']}, {reports[l]['seconds']}"
        for l in labels)]
    return "\n".join(out) + "\n"
