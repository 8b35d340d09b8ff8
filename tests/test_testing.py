"""`dbha.testing`: an application's tests make aliases fail, hang, come
back and be promoted with no server at all, and dbha decides as it would
in production."""

from __future__ import annotations

import pytest
from django.test import override_settings

import dbha
from dbha.testing import simulated_cluster
from localdb import free_port
from tests.conftest import TEST_DBHA, pg_settings
from tests.workload import status

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

#: Nothing listens on these ports: every answer is the script's.
NOWHERE = {alias: pg_settings(free_port()) for alias in ("default", "failover1", "failover2")}


def test_a_failover_without_servers() -> None:
    settings = {**TEST_DBHA, "READS": "replicas", "MAX_REPLICA_LAG": 2}
    with override_settings(DATABASES=NOWHERE, DBHA=settings), simulated_cluster() as cluster:
        # Reads first: after `available_db()` (a write, for read-your-writes)
        # this thread's reads would wait for the standbys to catch up.
        assert {dbha.read_db() for _ in range(4)} == {"failover1", "failover2"}
        cluster.lag("failover1", 10)
        assert {dbha.read_db() for _ in range(4)} == {"failover2"}
        assert dbha.available_db() == "default"

        cluster.kill("default")
        assert status("default").last_error == "connection refused"
        assert dbha.group_status()[0].route == "no_writer"
        cluster.promote("failover2")
        assert dbha.available_db() == "failover2"

        cluster.revive("default")  # back as a primary on an older timeline
        assert status("default").split_brain
        assert dbha.available_db() == "failover2"
        cluster.demote("default")
        assert not status("default").split_brain

        cluster.hang("failover2")
        assert status("failover2").last_error == "timeout"
        assert dbha.group_status()[0].writer is None
    # Real probing again: nothing answers.
    with override_settings(DATABASES=NOWHERE, DBHA=TEST_DBHA):
        assert {s.state for s in dbha.status()} == {"down"}


def test_no_writer_raises_as_configured() -> None:
    settings = {**TEST_DBHA, "ON_ALL_DOWN": "raise"}
    with override_settings(DATABASES=NOWHERE, DBHA=settings), simulated_cluster() as cluster:
        cluster.kill("default")
        with pytest.raises(dbha.NoHealthyDatabase, match="default"):
            dbha.available_db()


def test_an_unknown_alias_is_a_clear_error() -> None:
    with (
        override_settings(DATABASES=NOWHERE, DBHA=TEST_DBHA),
        simulated_cluster() as cluster,
        pytest.raises(ValueError, match="does not watch alias 'nope'"),
    ):
        cluster.kill("nope")
