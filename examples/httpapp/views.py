"""A write and its read-back through the ORM, sync (gunicorn) and async
(uvicorn); each answer says which process served it and where the write
and the read went, and a database error is a 503 naming its class."""

from __future__ import annotations

import os

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse

from httpapp.models import Order


def order(request: HttpRequest) -> JsonResponse:
    note = request.GET["note"]
    try:
        written = Order.objects.create(note=note)
        # PinningMiddleware sends this read where the write is.
        back = Order.objects.filter(note=note)
        found = back.exists()
    except DatabaseError as e:
        return failed(e)
    return JsonResponse(
        {"pid": os.getpid(), "db": written._state.db, "read_db": back.db, "found": found}
    )


async def order_async(request: HttpRequest) -> JsonResponse:
    note = request.GET["note"]
    try:
        written = await Order.objects.acreate(note=note)
        back = Order.objects.filter(note=note)
        found = await back.aexists()
        # Routed where the async ORM runs its query: in the request's
        # sync thread, which carries the request's pin.
        read_db = await sync_to_async(lambda: back.db)()
    except DatabaseError as e:
        return failed(e)
    return JsonResponse(
        {"pid": os.getpid(), "db": written._state.db, "read_db": read_db, "found": found}
    )


def failed(error: DatabaseError) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), "error": type(error).__name__}, status=503)


def from_loopback(request: HttpRequest) -> bool:
    """DBHA["HEALTH_VIEW_ACCESS"]: node details for local clients only."""
    return request.META.get("REMOTE_ADDR") in ("127.0.0.1", "::1")
