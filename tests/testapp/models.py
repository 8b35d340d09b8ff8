"""Models the tests write through the router."""

from django.db import models


class Item(models.Model):
    """Lives in the main group."""

    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"


class Report(models.Model):
    """Routed to the "reports" group by tests that configure one."""

    title = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"
