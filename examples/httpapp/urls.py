from django.urls import include, path

from httpapp import views

urlpatterns = [
    path("order", views.order),
    path("order-async", views.order_async),
    path("dbha/", include("dbha.urls")),
]
