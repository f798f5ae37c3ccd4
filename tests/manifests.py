"""Reads what daemonset/ ships (manifests, alert rules, the Grafana dashboard) for the tests,
and finds the metric names a PromQL expression selects."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import yaml

DAEMONSET_DIR = Path(__file__).resolve().parents[1] / "daemonset"
MANIFESTS = ("namespace.yaml", "rbac.yaml", "daemonset.yaml", "service.yaml", "relay.yaml", "servicemonitor.yaml",
             "podmonitor.yaml", "prometheusrule.yaml")

# PromQL words that are not metric names (functions, aggregations, keywords)
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "absent",
    "absent_over_time", "clamp_min", "clamp_max", "label_replace", "label_join", "vector", "scalar", "time",
    "sum_over_time", "avg_over_time", "max_over_time", "min_over_time", "resets", "changes", "sort",
    "sort_desc", "round", "ceil", "floor", "exp", "ln", "log2", "log10", "sqrt", "timestamp", "inf", "nan",
}
# produced by Prometheus itself for every target, not by the agent
SCRAPE_SYNTHESIZED = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def documents(name: str) -> List[Dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DAEMONSET_DIR / name).read_text()) if d]


def all_documents() -> Iterator[Tuple[str, Dict[str, Any]]]:
    for name in MANIFESTS:
        for doc in documents(name):
            yield name, doc


def rule_groups() -> List[Dict[str, Any]]:
    (rule,) = documents("prometheusrule.yaml")
    return rule["spec"]["groups"]


def dashboard() -> Dict[str, Any]:
    return json.loads((DAEMONSET_DIR / "grafana-dashboard.json").read_text())


def dashboard_queries() -> List[str]:
    out = []
    for p in dashboard()["panels"]:
        out += [t["expr"] for t in p.get("targets", [])]
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            out.append(m.group(1) if m else q)
    return out


def rule_queries() -> List[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]


def recorded_names() -> Set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> Set[str]:
    """Metric names an expression selects: identifiers left after removing strings, label
    matchers {...}, ranges [...], grouping lists by/on/without/ignoring(...), numbers and
    PromQL's own words."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set(re.findall(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", e))
    return {n for n in names if n.lower() not in PROMQL_WORDS}
