"""meshlens exporter: serves snapshots of the agent's state (Prometheus today; REST and gRPC later).

Reads only; never writes back into the agent.
"""
