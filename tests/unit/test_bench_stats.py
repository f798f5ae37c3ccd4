"""Unit tests for the bench's statistics, round scheduling, target verdicts and report
rendering (bench/stats.py, bench/rounds.py, bench/targets.py, bench/report.py). No root,
no kernel: pure functions on numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.report import SectionResult, Table, fmt_summary, write_reports
from bench.rounds import compare, schedule
from bench.stats import (Error, bucket_interval, histogram_quantile, median, paired_ratios, pct_delta, quantile,
                         ratio, summarize)
from bench.targets import Target, Verdict, verdict
from bench.workloads import rate_plan, throttle_script


# ---- medians, quantiles, spread ---------------------------------------------------------

def test_median_odd_even_and_unsorted() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert median([7]) == 7


def test_median_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        median([])


def test_quantile_interpolates_between_order_statistics() -> None:
    vals = [10, 20, 30, 40, 50]
    assert quantile(vals, 0.0) == 10
    assert quantile(vals, 1.0) == 50
    assert quantile(vals, 0.25) == 20
    assert quantile([0, 10], 0.75) == pytest.approx(7.5)
    with pytest.raises(ValueError):
        quantile(vals, 1.5)


def test_summarize_gives_median_range_and_iqr() -> None:
    s = summarize([5, 1, 9, 3, 7])
    assert (s.median, s.min, s.max, s.n) == (5, 1, 9, 5)
    assert (s.q1, s.q3) == (3, 7)
    assert s.iqr == 4


def test_summarize_empty_is_nan_with_n_zero() -> None:
    s = summarize([])
    assert s.n == 0 and math.isnan(s.median)
    assert fmt_summary(s) == "n/a"


def test_fmt_summary_shows_median_and_range() -> None:
    assert fmt_summary(summarize([1.0, 2.0, 3.0])) == "2 [1–3]"
    assert fmt_summary(summarize([2.5])) == "2.5"


# ---- ratios and deltas ----------------------------------------------------------------

def test_ratio_and_pct_delta() -> None:
    assert ratio(98, 100) == pytest.approx(0.98)
    assert pct_delta(105, 100) == pytest.approx(5.0)
    assert pct_delta(90, 100) == pytest.approx(-10.0)
    assert math.isnan(ratio(1, 0)) and math.isnan(pct_delta(1, 0))


def test_paired_ratios_pair_by_index() -> None:
    assert paired_ratios([90, 200], [100, 100]) == [pytest.approx(0.9), pytest.approx(2.0)]
    with pytest.raises(ValueError):
        paired_ratios([1], [1, 2])


def test_error_absolute_percent_and_exact() -> None:
    e = Error(1010, 1000)
    assert e.absolute == 10 and e.percent == pytest.approx(1.0) and not e.exact
    assert Error(5, 5).exact and Error(5, 5).percent == 0.0
    assert Error(0, 0).percent == 0.0
    assert Error(3, 0).percent is None  # undefined relative error, reported as n/a


# ---- histograms ------------------------------------------------------------------------

def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.005, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.0025)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.0075)


def test_histogram_quantile_in_inf_bucket_returns_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, [(0.005, 10.0), (float("inf"), 100.0)]) == 0.005
    assert math.isnan(histogram_quantile(0.5, [(0.005, 0.0), (float("inf"), 0.0)]))


def test_bucket_interval_names_the_bucket_holding_the_rank() -> None:
    buckets = [(0.005, 90.0), (0.01, 99.0), (0.025, 100.0), (float("inf"), 100.0)]
    assert bucket_interval(0.5, buckets) == (0.0, 0.005)
    assert bucket_interval(0.99, buckets) == (0.005, 0.01)
    assert bucket_interval(1.0, buckets) == (0.01, 0.025)


# ---- rounds ----------------------------------------------------------------------------

def test_schedule_alternates_and_reverses_every_other_block() -> None:
    assert schedule(["base", "agent"], 2) == [(0, "base"), (0, "agent"), (1, "agent"), (1, "base")]
    s = schedule(["base", "l4", "full"], 3)
    assert [m for _, m in s] == ["base", "l4", "full", "full", "l4", "base", "base", "l4", "full"]
    with pytest.raises(ValueError):
        schedule([], 1)


def test_compare_ratio_of_medians_and_paired_spread() -> None:
    values = [(0, "base", 100.0), (0, "agent", 97.0), (1, "base", 110.0), (1, "agent", 99.0),
              (2, "base", 105.0), (2, "agent", 105.0)]
    out = compare(values)
    assert out["base"]["ratio_pct"] == pytest.approx(100.0)
    assert out["agent"]["summary"].median == 99.0
    assert out["agent"]["ratio_pct"] == pytest.approx(100 * 99 / 105)
    paired = out["agent"]["paired_pct"]
    assert paired.min == pytest.approx(90.0) and paired.max == pytest.approx(100.0)
    assert paired.median == pytest.approx(97.0)
    with pytest.raises(ValueError):
        compare([(0, "agent", 1.0)])


# ---- targets ---------------------------------------------------------------------------

def test_max_target_met_and_missed_with_signed_margin() -> None:
    ok = verdict("kernel_ns_per_request", 240.0)
    assert ok.met is True and ok.margin == pytest.approx(60.0) and ok.margin_pct == pytest.approx(20.0)
    bad = verdict("kernel_ns_per_request", 450.0)
    assert bad.met is False and bad.margin == pytest.approx(-150.0) and bad.margin_pct == pytest.approx(-50.0)
    assert bad.sentence().startswith("MISSED") and "150 ns over" in bad.sentence()


def test_min_target_counts_shortfall() -> None:
    v = verdict("throughput_ratio_full", 96.5)
    assert v.met is False and v.margin == pytest.approx(-1.5)
    assert "short" in v.sentence()
    assert verdict("throughput_ratio_full", 98.0).met is True  # the limit itself meets the target


def test_zero_limit_target_and_unevaluated() -> None:
    assert verdict("lost_at_20k", 0).met is True
    lost = verdict("lost_at_20k", 3)
    assert lost.met is False and lost.margin_pct is None
    nothing = verdict("scrape_10k", None, "section failed")
    assert nothing.met is None and nothing.sentence() == "not evaluated: section failed"
    assert Verdict(Target("x", "x", 1.0, "u", "max"), float("nan")).met is None


def test_target_kind_is_checked() -> None:
    with pytest.raises(ValueError):
        Target("x", "x", 1.0, "u", "between")


# ---- workload plans and the report -------------------------------------------------------

def test_rate_plan_and_throttle_script() -> None:
    assert rate_plan(20000, 10) == {"connections": 200, "delay_ms": 10}
    assert rate_plan(1, 10)["connections"] == 1
    assert "return 7" in throttle_script(7)


def test_write_reports_renders_targets_tables_and_json(tmp_path: Path) -> None:
    t = Table("tput", ["mode", "value"])
    t.add("base", "1")
    sec = SectionResult("overhead", "1. Overhead", tables=[t], notes=["a note"],
                        verdicts=[verdict("scrape_10k", 130.0, "HTTP GET")], data={"x": float("nan"), "s": summarize([1, 2])})
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    write_reports([sec], {"date": "d", "warnings": ["busy machine"]}, ["close it"], md, js)
    text = md.read_text()
    assert "**Caveat:** busy machine" in text and "| base | 1 |" in text and "MISSED" in text and "- close it" in text
    doc = json.loads(js.read_text())
    assert doc["targets"][0]["met"] is False and doc["targets"][0]["margin"] == pytest.approx(-30.0)
    assert doc["sections"]["overhead"]["data"]["x"] is None  # NaN is not JSON: written as null
    assert doc["sections"]["overhead"]["data"]["s"]["median"] == 1.5
