"""meshlens benchmarks: overhead on workloads, agent cost, capacity, accuracy, exporter.

Run with `make bench` (or `python -m bench.run [--quick] [--only SECTION]`); writes
bench/report.md and bench/report.json. A report, not a test: nothing here passes or fails.
"""
