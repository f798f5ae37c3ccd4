"""Prometheus surface: the one table of metric definitions, the collector that builds metric
families from a snapshot on every scrape, and the fast text writer."""
