"""Section results and the two report files (bench/report.json, bench/report.md).

A section returns a `SectionResult`: its tables (already formatted for people), its raw
data (for the JSON), notes, and verdicts on the issue's targets. `write_reports` renders
every section plus a targets summary at the top.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .targets import Verdict


@dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[List[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        head = f"**{self.title}**\n\n" if self.title else ""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return head + "\n".join(lines) + "\n"


@dataclass
class SectionResult:
    name: str
    title: str
    intro: str = ""
    tables: List[Table] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    verdicts: List[Verdict] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None


def fmt(v: Optional[float], digits: int = 3) -> str:
    """Compact number: n/a for None/NaN, thousands separators for big values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v == int(v) and abs(v) < 1000 and isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def fmt_summary(s: Summary, digits: int = 3) -> str:
    """'median [min–max]'."""
    if s.n == 0:
        return "n/a"
    if s.n == 1:
        return fmt(s.median, digits)
    return f"{fmt(s.median, digits)} [{fmt(s.min, digits)}–{fmt(s.max, digits)}]"


def fmt_pct(v: Optional[float], signed: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.1f}%" if signed else f"{v:.1f}%"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "as_dict"):  # Summary, Verdict, Error
        return _jsonable(obj.as_dict())
    return obj


def targets_table(verdicts: Sequence[Verdict]) -> Table:
    t = Table("Targets", ["target", "limit", "measured", "verdict", "note"])
    for v in verdicts:
        lim = f"{'≤' if v.target.kind == 'max' else '≥'} {fmt(v.target.limit)} {v.target.unit}"
        verdict_s = v.sentence()
        if v.met is False:
            verdict_s = f"**{verdict_s}**"
        t.add(v.target.description, lim, fmt(v.measured), verdict_s, v.note)
    return t


def write_reports(sections: Sequence[SectionResult], env: Dict[str, Any], closing: Sequence[str],
                  md_path: Path, json_path: Path) -> None:
    verdicts = [v for s in sections for v in s.verdicts]
    doc = {"environment": env, "targets": [v.as_dict() for v in verdicts],
           "sections": {s.name: {"title": s.title, "seconds": s.seconds, "error": s.error, "notes": s.notes,
                                  "data": s.data} for s in sections},
           "closing": list(closing)}
    json_path.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=False) + "\n")
    out = ["# meshlens benchmark report", ""]
    out.append(f"Generated {env.get('date')} on {env.get('host')} (Linux {env.get('kernel')}, {env.get('cpus')} CPUs), "
               f"commit {env.get('commit')}, mode {'quick' if env.get('quick') else 'full'}, "
               f"{env.get('total_seconds', 0):.0f} s. How to read it: bench/README.md.")
    out.append("")
    for line in env.get("warnings", []):
        out.append(f"> **Caveat:** {line}")
        out.append("")
    out.append(targets_table(verdicts).markdown())
    if closing:
        out.append("**What would close the misses / notes**\n")
        out += [f"- {c}" for c in closing]
        out.append("")
    for s in sections:
        out.append(f"## {s.title}")
        out.append("")
        if s.error:
            out.append(f"Section failed: `{s.error}`\n")
        if s.intro:
            out.append(s.intro + "\n")
        for t in s.tables:
            out.append(t.markdown())
        for n in s.notes:
            out.append(f"- {n}")
        if s.notes:
            out.append("")
        out.append(f"_{s.seconds:.0f} s_\n")
    env_t = Table("Environment", ["key", "value"])
    for k, v in env.items():
        if k != "warnings":
            env_t.add(k, json.dumps(_jsonable(v)) if isinstance(v, (dict, list)) else v)
    out.append("## Environment\n")
    out.append(env_t.markdown())
    md_path.write_text("\n".join(out))
