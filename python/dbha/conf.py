"""Reads dbha's settings from Django: lazily, on first use, never at import
time (the checker calls `read_settings()` when it starts)."""

from typing import Any


def read_settings() -> tuple[Any, Any]:
    """`settings.DATABASES` and `settings.DBHA` (None when unset)."""
    from django.conf import settings

    return settings.DATABASES, getattr(settings, "DBHA", None)
