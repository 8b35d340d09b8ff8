"""dbha with ordinary Django code on real PostgreSQL: instance hints,
transactions opened by turning autocommit off, and migrations on a
replicated group."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections, transaction
from django.test import override_settings

import dbha
from tests.conftest import PG_PORTS, TEST_DBHA, Cluster, pg_settings, wait_for
from tests.testapp.models import Item

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

REPLICAS = {**TEST_DBHA, "READS": "replicas"}


@pytest.fixture
def with_unmanaged_alias(cluster: Cluster) -> Iterator[None]:
    """`other`: a database in DATABASES that dbha does not manage."""
    databases = {alias: pg_settings(port) for alias, port in PG_PORTS.items()}
    databases["other"] = pg_settings(PG_PORTS["default"])
    groups = {"GROUPS": {"main": ["default", "failover1", "failover2"]}}
    with override_settings(DATABASES=databases, DBHA={**REPLICAS, **groups}):
        yield
    connections.close_all()


def loaded_from(alias: str) -> Item:
    item = Item(name="x")
    item._state.db = alias
    return item


def test_an_instance_hint_keeps_an_unmanaged_database_and_picks_the_group(
    with_unmanaged_alias: None,
) -> None:
    router = dbha.ModelDatabaseRouter()
    wait_for(lambda: dbha.read_db("main") != "default", what="replica reads")
    # Loaded from a database dbha does not manage: no opinion, so Django
    # keeps it where it lives.
    other = loaded_from("other")
    assert router.db_for_write(Item, instance=other) is None
    assert router.db_for_read(Item, instance=other) is None
    # Loaded from a standby of the group: writes go to the group's writer,
    # reads follow the read rules.
    replica = loaded_from("failover1")
    assert router.db_for_write(Item, instance=replica) == "default"
    assert router.db_for_read(Item, instance=replica) in {"default", "failover1", "failover2"}
    # Unsaved: the model's route.
    assert router.db_for_write(Item, instance=Item(name="new")) == "default"


def test_reads_stay_on_the_writer_while_autocommit_is_off(cluster: Cluster) -> None:
    with override_settings(DBHA=REPLICAS):
        router = dbha.ModelDatabaseRouter()
        wait_for(lambda: router.db_for_read(Item) != "default", what="replica reads")
        transaction.set_autocommit(False, using="default")
        try:
            assert router.db_for_read(Item) == "default"
            Item.objects.using("default").create(name="manual")
            assert Item.objects.filter(name="manual").exists(), "read on the writer"
        finally:
            transaction.rollback(using="default")
            transaction.set_autocommit(True, using="default")
        assert router.db_for_read(Item) != "default"
        connections.close_all()


def test_migrations_go_to_the_writer_never_to_a_standby(cluster: Cluster) -> None:
    router = dbha.ModelDatabaseRouter()
    assert dbha.available_db() == "default"
    assert router.allow_migrate("default", "testapp") is None
    assert router.allow_migrate("failover1", "testapp") is False
    assert router.allow_migrate("failover2", "testapp", model_name="item") is False
    with pytest.raises(CommandError, match=r"'failover1' is a standby.*now 'default'"):
        call_command("migrate", database="failover1", verbosity=0)
    connections.close_all()
