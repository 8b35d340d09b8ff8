"""Django configured against a local `localdb.PgCluster`, with one model to
write: shared by the demo and the failover benchmark."""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

from localdb import PgCluster

ALIASES = ("default", "failover1", "failover2")


#: dbha's PostgreSQL backend: Django's, reporting failures to dbha.
REPORTING_ENGINE = "dbha.backends.postgresql"
#: Django's own: the application reports nothing.
PLAIN_ENGINE = "django.db.backends.postgresql"


def configure(cluster: PgCluster, dbha: dict[str, Any] | None = None) -> type[Any]:
    """Points `default`, `failover1`, `failover2` (as many as the cluster
    has servers) at the cluster through dbha's backend (CONN_MAX_AGE=0: a
    connection per request), routes through dbha, creates the `Order` table
    on the primary and returns the model."""
    settings.configure(
        DATABASES={
            alias: {
                "ENGINE": REPORTING_ENGINE,
                "HOST": server.host,
                "PORT": server.port,
                "NAME": "postgres",
                "USER": "postgres",
                "CONN_MAX_AGE": 0,
                "OPTIONS": {"connect_timeout": 2},
            }
            for alias, server in zip(ALIASES, cluster.servers, strict=False)
        },
        DATABASE_ROUTERS=["dbha.ModelDatabaseRouter"],
        INSTALLED_APPS=[],
        USE_TZ=True,
        **({"DBHA": dbha} if dbha else {}),
    )
    django.setup()
    from django.db import models

    class Order(models.Model):
        note = models.CharField(max_length=50)

        class Meta:
            app_label = "localdjango"

    create_table(cluster, Order)
    return Order


def create_table(cluster: PgCluster, model: type[Any]) -> None:
    """Creates `model`'s table on the primary and waits for the standbys."""
    from django.db import connections

    with connections["default"].schema_editor() as editor:
        editor.create_model(model)
    connections.close_all()
    cluster.wait_replayed()


def use_engine(engine: str) -> None:
    """Every alias uses `engine` in threads that connect from now on
    (Django makes a connection object per thread from these settings)."""
    for entry in settings.DATABASES.values():
        entry["ENGINE"] = engine
