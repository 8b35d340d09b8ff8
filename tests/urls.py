"""URLs for the health view tests: dbha's view as a project mounts it, and a
plain view beside it to show what ATOMIC_REQUESTS does to a view that is not
exempt."""

from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("no database here")


urlpatterns = [
    path("dbha/", include("dbha.urls")),
    path("plain/", plain),
]
