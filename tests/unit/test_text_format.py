"""The fast text writer says exactly what client_python's generate_latest says: both outputs
parse to the same samples (names, labels, values), including awkward label values."""
from __future__ import annotations

import math

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from meshlens.exporter.prometheus.text_format import render


def families():
    c = CounterMetricFamily("meshlens_x_bytes", 'Help with a \\ backslash\nand newline.', labels=["a", "b"])
    c.add_metric(["plain", 'quote " here'], 4099)
    c.add_metric(["back\\slash", "new\nline"], 1.5)
    g = GaugeMetricFamily("meshlens_x_active", "Gauge.", labels=[])
    g.add_metric([], math.inf)
    h = HistogramMetricFamily("meshlens_x_seconds", "Histogram.", labels=["route"])
    h.add_metric(["/users/{id}"], [("0.005", 1), ("0.05", 3), ("+Inf", 4)], 0.123)
    h.add_metric([""], [("0.005", 0), ("0.05", 0), ("+Inf", 2)], 9.5)
    nolabel = HistogramMetricFamily("meshlens_y_seconds", "No labels.", labels=[])
    nolabel.add_metric([], [("1.0", 1), ("+Inf", 1)], 0.5)
    return [c, g, h, nolabel]


class _Fixed(Collector):
    def collect(self):
        return families()


def parsed(text: str):
    out = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.add((s.name, tuple(sorted(s.labels.items())), s.value))
    return out


def test_same_samples_as_client_python() -> None:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed())
    reference = parsed(generate_latest(reg).decode())
    ours = parsed(render(families()).decode())
    assert ours == reference
    assert ("meshlens_x_bytes_total", (("a", "plain"), ("b", 'quote " here')), 4099.0) in ours
    assert ("meshlens_x_seconds_bucket", (("le", "+Inf"), ("route", "/users/{id}")), 4.0) in ours


def test_help_and_type_lines() -> None:
    text = render(families()).decode()
    assert "# TYPE meshlens_x_bytes_total counter\n" in text
    assert "# HELP meshlens_x_bytes_total Help with a \\\\ backslash\\nand newline.\n" in text
    assert "# TYPE meshlens_x_seconds histogram\n" in text
    assert 'meshlens_y_seconds_bucket{le="1.0"} 1\n' in text
    assert "meshlens_x_active +Inf\n" in text
