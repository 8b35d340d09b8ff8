"""Exceptions dbha raises at runtime (settings problems raise Django's
`ImproperlyConfigured`)."""

from django.db.utils import OperationalError


class NoHealthyDatabase(OperationalError):
    """No database of the group is up, and `DBHA["ON_ALL_DOWN"]` is `"raise"`.

    The message names each alias and why it is down. A subclass of Django's
    `OperationalError`, so code that handles a lost database handles this too.
    """
