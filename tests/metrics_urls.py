"""django-prometheus's own `/metrics` view, as a project mounts it."""

from django.urls import path
from django_prometheus.exports import ExportToDjangoView

urlpatterns = [path("metrics", ExportToDjangoView)]
