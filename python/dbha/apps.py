"""The optional Django app: add "dbha" to INSTALLED_APPS for system checks."""

from django.apps import AppConfig
from django.core import checks


class DbhaConfig(AppConfig):
    name = "dbha"
    verbose_name = "Database high availability"

    def ready(self) -> None:
        from dbha.checks import check_settings

        checks.register(check_settings)
