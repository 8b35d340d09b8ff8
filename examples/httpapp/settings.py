"""Settings from the environment: HTTPAPP_DB_PORTS gives the ports of
`default`, `failover1` and `failover2` (comma-separated) on
HTTPAPP_DB_HOST (127.0.0.1); HTTPAPP_READS is dbha's READS ("replicas",
so that PinningMiddleware has work to do); HTTPAPP_DBHA, a JSON object,
overrides other DBHA keys."""

import json
import os

_HOST = os.environ.get("HTTPAPP_DB_HOST", "127.0.0.1")
_PORTS = os.environ.get("HTTPAPP_DB_PORTS", "5432,5433,5434").split(",")

DATABASES = {
    alias: {
        # Django's PostgreSQL backend, reporting the application's failed
        # connects, lost sessions and read-only errors to dbha.
        "ENGINE": "dbha.backends.postgresql",
        "HOST": _HOST,
        "PORT": port,
        "NAME": "postgres",
        "USER": "postgres",
        # A connection per request: dbha moves new connections only.
        "CONN_MAX_AGE": 0,
        # libpq's minimum: a connect to a hung server gives up after 2 s.
        "OPTIONS": {"connect_timeout": 2},
    }
    for alias, port in zip(("default", "failover1", "failover2"), _PORTS, strict=True)
}
DATABASE_ROUTERS = ["dbha.ModelDatabaseRouter"]
# Every timing at its default (CHECK_INTERVAL 1 s, FAST_INTERVAL 0.1 s,
# CONNECT_TIMEOUT 0.5 s).
DBHA = {
    "READS": os.environ.get("HTTPAPP_READS", "replicas"),
    # Each worker's own view of dbha, for the benchmarks on loopback.
    "HEALTH_VIEW_ACCESS": "httpapp.views.from_loopback",
    **json.loads(os.environ.get("HTTPAPP_DBHA", "{}")),
}

INSTALLED_APPS = ["dbha", "httpapp"]
MIDDLEWARE = ["dbha.middleware.PinningMiddleware"]
ROOT_URLCONF = "httpapp.urls"
SECRET_KEY = "examples-httpapp-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# dbha's transitions (node down, writes moving) go to the server's log.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"}
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "dbha": {"handlers": ["stderr"], "level": "WARNING"},
        "django.request": {"handlers": ["stderr"], "level": "ERROR"},
    },
}
