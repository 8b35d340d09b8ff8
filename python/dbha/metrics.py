"""Prometheus metrics (the optional extra `django-dbha[prometheus]`): a
collector that reads dbha's status at each scrape, registered on
`prometheus_client`'s default registry when "dbha" is in INSTALLED_APPS, so
an existing django-prometheus `/metrics` shows them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from dbha.status import group_status

ROLES = ("primary", "standby", "unknown")


class DbhaCollector(Collector):
    """dbha's view of every node and group, as of the scrape."""

    def collect(self) -> Iterator[Metric]:
        try:
            groups = group_status()
        except Exception:
            # Misconfigured settings are the system checks' to report; a
            # scrape must not fail for them.
            return
        node = ["group", "alias"]
        up = GaugeMetricFamily("dbha_node_up", "1 if dbha has the node up, else 0", labels=node)
        role = GaugeMetricFamily(
            "dbha_node_role", "1 for the node's last seen role", labels=[*node, "role"]
        )
        writer = GaugeMetricFamily(
            "dbha_node_writer", "1 if the group's writes go to the node", labels=node
        )
        fenced = GaugeMetricFamily(
            "dbha_node_split_brain", "1 for a primary fenced off from writes", labels=node
        )
        lag = GaugeMetricFamily(
            "dbha_replica_lag_seconds", "A standby's replication lag, as last measured", labels=node
        )
        latency = GaugeMetricFamily(
            "dbha_probe_latency_seconds", "How long the node's last probe took", labels=node
        )
        errors = CounterMetricFamily(
            "dbha_probe_errors", "Failed probes, by reason", labels=[*node, "reason"]
        )
        reports = CounterMetricFamily(
            "dbha_failure_reports", "Failures the application reported", labels=node
        )
        healthy = GaugeMetricFamily(
            "dbha_group_healthy", "1 if the group has a healthy writer", labels=["group"]
        )
        changes = CounterMetricFamily(
            "dbha_writer_changes", "How often the group's writes moved", labels=["group"]
        )
        for group in groups:
            healthy.add_metric([group.name], float(group.healthy))
            changes.add_metric([group.name], group.writer_changes)
            for status in group.nodes:
                labels = [group.name, status.alias]
                up.add_metric(labels, float(status.state == "up"))
                for name in ROLES:
                    role.add_metric([*labels, name], float(status.role == name))
                writer.add_metric(labels, float(status.is_writer))
                fenced.add_metric(labels, float(status.split_brain))
                if status.lag is not None:
                    lag.add_metric(labels, status.lag)
                if status.latency is not None:
                    latency.add_metric(labels, status.latency)
                for reason, count in status.probe_errors.items():
                    errors.add_metric([*labels, reason], count)
                reports.add_metric(labels, status.reports)
        yield from (up, role, writer, fenced, lag, latency, errors, reports, healthy, changes)


_registered: set[int] = set()


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """Adds dbha's collector to `registry` (once)."""
    if id(registry) not in _registered:
        registry.register(DbhaCollector())
        _registered.add(id(registry))
