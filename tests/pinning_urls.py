"""Views that write and read through the ORM, for the pinning middleware's
tests: each says where its read went and whether it found the row."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.urls import path

from tests.testapp.models import Item


def write(request: HttpRequest) -> JsonResponse:
    item = Item.objects.create(name=request.GET["name"])
    return JsonResponse({"db": item._state.db})


def read(request: HttpRequest) -> JsonResponse:
    items = Item.objects.filter(name=request.GET["name"])
    return JsonResponse({"db": items.db, "found": items.exists()})


def write_then_read(request: HttpRequest) -> JsonResponse:
    Item.objects.create(name=request.GET["name"])
    items = Item.objects.filter(name=request.GET["name"])
    return JsonResponse({"db": items.db, "found": items.exists()})


async def read_async(request: HttpRequest) -> JsonResponse:
    items = Item.objects.filter(name=request.GET["name"])
    # Where the async ORM's query runs: in the request's sync thread, as
    # `aexists()` itself does.
    db = await sync_to_async(lambda: items.db)()
    return JsonResponse({"db": db, "found": await items.aexists()})


urlpatterns = [
    path("write", write),
    path("read", read),
    path("write-then-read", write_then_read),
    path("read-async", read_async),
]
