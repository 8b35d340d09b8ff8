"""The optional Django app: add "dbha" to INSTALLED_APPS for system checks,
the `manage.py dbha` command and the metrics."""

from django.apps import AppConfig
from django.core import checks


class DbhaConfig(AppConfig):
    name = "dbha"
    verbose_name = "Database high availability"

    def ready(self) -> None:
        from dbha import checks as dbha_checks

        checks.register(dbha_checks.check_settings)
        checks.register(dbha_checks.check_router)
        checks.register(dbha_checks.check_connections)
        checks.register(dbha_checks.check_health_view_access)
        try:
            from dbha import metrics
        except ImportError:
            return  # no prometheus_client: no metrics
        metrics.register()
