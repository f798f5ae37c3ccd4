"""The REST query API (FastAPI): flows, stat, routes, edges, service map, SMI, tap, status."""
