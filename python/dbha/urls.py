"""The health view's URL: `path("dbha/", include("dbha.urls"))`."""

from django.urls import path

from dbha import views

app_name = "dbha"

urlpatterns = [
    path("", views.health, name="health"),
]
