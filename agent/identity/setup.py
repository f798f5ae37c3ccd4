"""`meshlens run` flags for identity, and the objects they build.

Place in the data flow: the CLI builds an IdentitySetup once; its `view` (an IdentityView)
goes to whatever names series (exporters, service map); its `watcher` (None without
Kubernetes) feeds the view's ClusterState and reports its health through `status()`.

Flags:
  --kubernetes auto|on|off   auto: on when running in a pod (KUBERNETES_SERVICE_HOST) or
                             when --kubeconfig is given; off: standalone naming only
  --node-name NAME           pods are watched on this node only (default: $NODE_NAME, set
                             from the downward API spec.nodeName, else the host name)
  --kubeconfig PATH          use this kubeconfig instead of the pod's service account
  --cidr-names SPEC          name external peers: "10.0.0.0/8=corp,192.168.0.0/16=office"
  --pod-ttl SECONDS          series of a deleted pod stop being exported after this (300)
"""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional

from meshlens.agent.identity.cgroups import CgroupResolver
from meshlens.agent.identity.resolver import DEFAULT_TTL_S, IdentityResolver, parse_cidr_names
from meshlens.agent.identity.k8s_state import ClusterState
from meshlens.agent.identity.netns import NetnsLocator

if TYPE_CHECKING:  # the kubernetes client is imported only when the agent watches an API server
    from meshlens.agent.identity.k8s_watch import KubeWatcher, WatchStatus


def add_identity_arguments(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("identity")
    g.add_argument("--kubernetes", choices=["auto", "on", "off"], default="auto",
                   help="watch the Kubernetes API for pod/workload names (default %(default)s)")
    g.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name: only its pods are watched (default $NODE_NAME or host name)")
    g.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster service account)")
    g.add_argument("--cidr-names", default="", metavar="CIDR=NAME,...",
                   help='names for external peers, e.g. "10.0.0.0/8=corp"')
    g.add_argument("--pod-ttl", type=float, default=DEFAULT_TTL_S,
                   help="seconds after a pod's deletion before its series stop (default %(default)s)")


@dataclass
class IdentitySetup:
    view: IdentityResolver
    watcher: "Optional[KubeWatcher]" = None
    state: ClusterState = field(default_factory=ClusterState)

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.api.close()

    def status(self) -> "Dict[str, WatchStatus]":
        """Per-resource watch health for metrics; empty without Kubernetes."""
        return self.watcher.status() if self.watcher is not None else {}


def kubernetes_wanted(mode: str, kubeconfig: Optional[str]) -> bool:
    if mode == "auto":
        return bool(kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"))
    return mode == "on"


def identity_from_args(args: argparse.Namespace, cgroups: Optional[CgroupResolver] = None) -> IdentitySetup:
    """Build (not start) the resolver and, if wanted, the watcher. ValueError on bad flags."""
    cidrs = parse_cidr_names(args.cidr_names)
    if args.pod_ttl < 0:
        raise ValueError("--pod-ttl must not be negative")
    state = ClusterState()
    view = IdentityResolver(state, cgroups or CgroupResolver(), netns=NetnsLocator(), cidr_names=cidrs,
                            ttl_s=args.pod_ttl)
    watcher = None
    if kubernetes_wanted(args.kubernetes, args.kubeconfig):
        from meshlens.agent.identity.k8s_watch import KubeWatcher, WatchConfig, api_client

        in_cluster = None if args.kubeconfig is None else False
        try:
            api = api_client(kubeconfig=args.kubeconfig, in_cluster=in_cluster)
        except Exception as exc:  # noqa: BLE001 - ConfigException, OSError, YAML errors: one message
            raise ValueError(f"cannot configure the Kubernetes client: {exc}") from exc
        watcher = KubeWatcher(api, state, WatchConfig(node_name=args.node_name))
    return IdentitySetup(view, watcher, state)
