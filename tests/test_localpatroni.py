"""Smoke tests of tools/localpatroni.py: a real Patroni cluster elects node1,
takes writes through HAProxy, replicates them, and leaves nothing behind;
its REST API can be served over TLS behind basic auth."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from localpatroni import (
    LOOPBACK,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    HAProxy,
    PatroniCluster,
    processes_in,
)
from tests import certs


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_cluster_serves_through_haproxy_and_leaves_nothing_running() -> None:
    cluster = PatroniCluster(nodes=3)
    with cluster:
        assert cluster.leader() == "node1"
        roles = {m["name"]: m["role"] for m in cluster.members()}
        assert roles == {"node1": "leader", "node2": "replica", "node3": "replica"}
        with HAProxy(cluster) as proxy:
            proxy.wait_routes_to("node1")
            # Patroni, etcd, HAProxy and every PostgreSQL process.
            pids = processes_in(cluster.base_dir)
            assert all(cluster.node(n).postgres_pid() in pids for n in ("node1", "node2", "node3"))
            with psycopg.connect(
                host=LOOPBACK,
                port=proxy.port,
                dbname="postgres",
                user=SUPERUSER,
                password=SUPERUSER_PASSWORD,
                connect_timeout=5,
                autocommit=True,
            ) as conn:
                assert conn.execute("select pg_is_in_recovery()").fetchone() == (False,)
                conn.execute("create table smoke (v text)")
                conn.execute("insert into smoke values ('through haproxy')")
        with psycopg.connect(cluster.dsn("node2"), autocommit=True) as conn:
            assert conn.execute("select pg_is_in_recovery()").fetchone() == (True,)
            deadline = time.monotonic() + 10
            while conn.execute("select to_regclass('smoke')").fetchone() == (None,):
                assert time.monotonic() < deadline, "the table never reached node2"
                time.sleep(0.1)
            assert conn.execute("select v from smoke").fetchall() == [("through haproxy",)]
    assert not [pid for pid in pids if _running(pid)]
    assert not processes_in(cluster.base_dir)
    assert not cluster.base_dir.exists()


def test_rest_api_over_tls_with_basic_auth(tmp_path: Path) -> None:
    files = certs.make(tmp_path)
    with PatroniCluster(nodes=1, rest_auth=("patroni", "rest-password"), rest_tls=files) as cluster:
        node = cluster.node("node1")
        assert node.rest_url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(files.ca))
        with urllib.request.urlopen(f"{node.rest_url}/leader", context=trusted, timeout=5) as resp:
            assert resp.status == 200
        # Only the unsafe methods ask for credentials; the harness sends them.
        patch = urllib.request.Request(f"{node.rest_url}/config", data=b"{}", method="PATCH")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(patch, context=trusted, timeout=5)
        assert refused.value.code == 401
        cluster.pause()
        assert (node.status() or {}).get("pause") is True
