"""The health view: JSON for load balancers and monitoring, 200 while every
group has a writer and 503 otherwise; node details only for requests that
pass `DBHA["HEALTH_VIEW_ACCESS"]`."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from dbha import health as report
from dbha.status import group_status


class EveryAlias(set[str]):
    """Holds every database alias, also those added to DATABASES later
    (Django asks `alias in view._non_atomic_requests`)."""

    def __contains__(self, alias: object) -> bool:
        return True


# CSRF exempt: the view only reads, and answers every method but GET and
# HEAD with 405; without this, CsrfViewMiddleware would answer a POST 403
# first (and, with CSRF_USE_SESSIONS, load the session from the database).
@csrf_exempt
@require_safe
@never_cache
@transaction.non_atomic_requests
def health(request: HttpRequest) -> JsonResponse:
    details = report.may_see_details(request)
    try:
        groups = group_status()
    except ImproperlyConfigured as e:
        # Logged by Django as the server error it is.
        return JsonResponse(report.error_document(str(e) if details else None), status=503)
    body: dict[str, Any] = report.document(groups) if details else report.summary(groups)
    response = JsonResponse(body, status=200 if body["healthy"] else 503)
    # A group without a writer is the view's answer, not a server error:
    # Django would log each 503 at ERROR on `django.request` (and mail the
    # admins) for every poll of a load balancer; dbha logs the change itself.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


# `non_atomic_requests` exempts one alias; ATOMIC_REQUESTS on any other would
# open a connection to it for every request (and hang on a hung server),
# just to report on it.
health._non_atomic_requests = EveryAlias()  # type: ignore[attr-defined]
