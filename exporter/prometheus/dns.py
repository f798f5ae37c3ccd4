"""Builds the meshlens_dns_* families from the "dns" area of an AgentSnapshot
(agent/sources/l7/dns.DnsSnapshot): client-side lookups by process/cgroup, server, question type,
response code and (capped per workload) question name."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from meshlens.agent.sources.l7.dns import DnsSeriesKey, DnsSnapshot
from meshlens.agent.aggregate.snapshot import AgentSnapshot

from meshlens.agent.identity.model import LOCAL_LABELS, PEER_LABELS

from meshlens.exporter.prometheus.identity_labels import local_values, peer_values
from meshlens.exporter.prometheus.metrics import METRICS, MetricDef, family

DNS_LABELS: Tuple[str, ...] = ("dns_question_type", "dns_response_code", "dns_question_name", "server_address",
                               "server_port", "process", "cgroup", "netns") + LOCAL_LABELS + PEER_LABELS

DNS_METRICS: Dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef("meshlens_dns_requests", "counter", "DNS lookups answered (UDP), by question type and response code.",
                  DNS_LABELS),
        MetricDef("meshlens_dns_request_duration_seconds", "histogram",
                  "DNS lookup latency: query sent to response received.", DNS_LABELS),
        MetricDef("meshlens_dns_answers", "counter", "Answer records in DNS responses.", DNS_LABELS),
        MetricDef("meshlens_dns_unanswered", "counter", "DNS queries that got no response within the timeout.", ()),
        MetricDef("meshlens_dns_malformed", "counter", "DNS records the agent could not parse or pair.", ("kind",)),
    )
}
METRICS.update(DNS_METRICS)


def dns_labels(k: DnsSeriesKey, snap: AgentSnapshot) -> Optional[List[str]]:
    """Label values in DNS_LABELS order (the peer is the DNS server, often a Service); None
    for expired pods."""
    local = local_values(snap, k.cgroup_id, k.netns, k.process)
    peer = peer_values(snap, k.server_address)
    if local is None or peer is None:
        return None
    return [k.question_type, k.response_code, k.question_name, k.server_address, str(k.server_port),
            k.process, snap.cgroup_path(k.cgroup_id), str(k.netns)] + local + peer


def dns_families(snap: AgentSnapshot) -> Iterable[object]:
    area = snap.areas.get("dns")
    if not isinstance(area, DnsSnapshot):
        return []
    fams = {name: family(name) for name in DNS_METRICS}
    for k, st in area.series.items():
        labels = dns_labels(k, snap)
        if labels is None:
            continue
        fams["meshlens_dns_requests"].add_metric(labels, st.count)
        fams["meshlens_dns_answers"].add_metric(labels, st.answers)
        fams["meshlens_dns_request_duration_seconds"].add_metric(labels, st.duration.cumulative(), st.duration.total)
    fams["meshlens_dns_unanswered"].add_metric([], area.unanswered)
    fams["meshlens_dns_malformed"].add_metric(["malformed"], area.malformed)
    fams["meshlens_dns_malformed"].add_metric(["unmatched_response"], area.unmatched_responses)
    return list(fams.values())
