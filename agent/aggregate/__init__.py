"""Aggregate: folds the sources' facts into rollups (flow table), the service map and the
agent-wide snapshot that every user surface reads."""
