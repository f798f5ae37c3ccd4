"""The Kubernetes resources identity watches, by their API plural names.

Shared by agent/identity/k8s_watch.py (what it lists and watches) and the modules that read
its results (k8s_state.py, resolver.py), which therefore do not import the `kubernetes`
client (about 0.4 s at start, more on a small node) unless the agent watches an API server.
"""
from __future__ import annotations

from typing import Tuple

POD, SERVICE, ENDPOINTSLICE = "pods", "services", "endpointslices"
REPLICASET, DEPLOYMENT, DAEMONSET, STATEFULSET, JOB = "replicasets", "deployments", "daemonsets", "statefulsets", "jobs"
ALL_RESOURCES: Tuple[str, ...] = (POD, SERVICE, ENDPOINTSLICE, REPLICASET, DEPLOYMENT, DAEMONSET, STATEFULSET, JOB)
