from django.urls import path

from . import views

urlpatterns = [
    path("models/", views.model_list, name="model_list"),
    path("models/<path:model_id>/delete/", views.model_delete, name="model_delete"),
    path("playground/", views.playground, name="playground"),
]
