"""Settings of the Django project that `test_backends.py` runs in
subprocesses (Django's test runner, psycopg2): the databases come as JSON
in DBHA_TEST_DATABASES."""

import json
import os

DATABASES = json.loads(os.environ["DBHA_TEST_DATABASES"])
DATABASE_ROUTERS = ["dbha.ModelDatabaseRouter"]
DBHA = {"CHECK_INTERVAL": 0.2, "CONNECT_TIMEOUT": 0.5}
INSTALLED_APPS = ["dbha", "tests.testapp"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
SECRET_KEY = "only-for-tests"
