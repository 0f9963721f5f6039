from django.urls import path

from . import views

urlpatterns = [
    path("", views.dataset_list, name="dataset_list"),
    path("upload/", views.dataset_upload, name="dataset_upload"),
    path("<str:public_id>/", views.dataset_detail, name="dataset_detail"),
    path("<str:public_id>/delete/", views.dataset_delete, name="dataset_delete"),
    path("<str:public_id>/preview/", views.dataset_preview, name="dataset_preview"),
    path("<str:public_id>/split/", views.dataset_split, name="dataset_split"),
    path("<str:public_id>/dedupe/", views.dataset_dedupe, name="dataset_dedupe"),
]
