"""Django system checks: `dbha.E001` for settings dbha cannot use."""

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured

from dbha import _core


def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    try:
        _core.validate_settings(settings.DATABASES, getattr(settings, "DBHA", None))
    except ImproperlyConfigured as e:
        return [
            Error(
                str(e),
                hint="See the settings reference in django-dbha's README.",
                id="dbha.E001",
            )
        ]
    return []
