"""Prometheus text exposition (format 0.0.4) of metric families, written for speed.

The collector's families are the same ones client_python would render; this writer differs
only in cost: a flow rollup contributes dozens of series (counters, three histograms) that
share one label set, so each distinct label set is escaped and joined once per scrape instead
of once per sample. Output is what generate_latest produces, up to label order within braces
and float spelling (both free in the format); the tests parse it back and compare values.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        v = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


def _value(v: float) -> str:
    if type(v) is int:  # counts (bucket counts, counters): exact and cheap
        return str(v)
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    return repr(float(v))


def render(families: Iterable[object]) -> bytes:
    out: List[str] = []
    label_text: Dict[Tuple[Tuple[str, str], ...], str] = {}
    for fam in families:
        name = fam.name  # type: ignore[attr-defined]
        mtype = fam.type  # type: ignore[attr-defined]
        mname = name + "_total" if mtype == "counter" else name
        doc = fam.documentation.replace("\\", "\\\\").replace("\n", "\\n")  # type: ignore[attr-defined]
        out.append(f"# HELP {mname} {doc}\n# TYPE {mname} {'untyped' if mtype == 'unknown' else mtype}\n")
        for s in fam.samples:  # type: ignore[attr-defined]
            if s.name.endswith("_created"):
                continue
            labels = s.labels
            if not labels:
                out.append(f"{s.name} {_value(s.value)}\n")
                continue
            items = tuple(labels.items())
            le = None
            if items[-1][0] == "le":  # histogram buckets: the shared part is cached without le
                le = items[-1][1]
                items = items[:-1]
            text = label_text.get(items)
            if text is None:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in items)
                label_text[items] = text
            if le is None:
                out.append(f"{s.name}{{{text}}} {_value(s.value)}\n")
            else:
                out.append(f'{s.name}{{{text},le="{le}"}} {_value(s.value)}\n' if text
                           else f'{s.name}{{le="{le}"}} {_value(s.value)}\n')
    return "".join(out).encode()
