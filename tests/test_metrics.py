"""dbha's Prometheus metrics on a real cluster, as django-prometheus's
`/metrics` serves them."""

from __future__ import annotations

from django.test import Client, override_settings
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import dbha
from dbha.metrics import register
from tests.conftest import Cluster, wait_for
from tests.workload import status


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_the_app_registers_metrics_that_follow_the_cluster(cluster: Cluster) -> None:
    assert dbha.available_db() == "default"
    node = {"group": "default", "alias": "default"}
    assert sample("dbha_node_up", **node) == 1.0
    assert sample("dbha_node_writer", **node) == 1.0
    assert sample("dbha_node_role", **node, role="primary") == 1.0
    assert sample("dbha_node_role", group="default", alias="failover1", role="standby") == 1.0
    assert sample("dbha_group_healthy", group="default") == 1.0
    assert (sample("dbha_probe_latency_seconds", **node) or 0) > 0
    assert sample("dbha_replica_lag_seconds", group="default", alias="failover1") is not None

    cluster.servers["default"].kill()
    wait_for(lambda: status("default").state == "down", what="the kill")
    dbha.report_failure("default")
    assert sample("dbha_node_up", **node) == 0.0
    assert sample("dbha_group_healthy", group="default") == 0.0
    assert sample("dbha_failure_reports_total", **node) == 1.0
    refused = sample("dbha_probe_errors_total", **node, reason="refused") or 0
    closed = sample("dbha_probe_errors_total", **node, reason="closed") or 0
    assert refused + closed >= 1
    cluster.servers["failover2"].promote()
    wait_for(lambda: sample("dbha_node_writer", group="default", alias="failover2") == 1.0,
             what="the new writer")  # fmt: skip
    assert sample("dbha_writer_changes_total", group="default") == 1.0


def test_django_prometheus_serves_them(cluster: Cluster) -> None:
    dbha.available_db()
    with override_settings(ROOT_URLCONF="tests.metrics_urls"):
        body = Client().get("/metrics").content.decode()
    assert 'dbha_node_up{alias="default",group="default"} 1.0' in body
    assert "dbha_writer_changes_total" in body
    assert "s3cret-password" not in body


def test_registering_twice_is_harmless() -> None:
    registry = CollectorRegistry()
    register(registry)
    register(registry)
    assert generate_latest(registry).count(b"# TYPE dbha_node_up gauge") == 1
