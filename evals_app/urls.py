from django.urls import path

from . import views

urlpatterns = [
    path("", views.eval_list, name="eval_list"),
    path("<str:eval_id>/", views.eval_detail, name="eval_detail"),
    path("<str:eval_id>/progress/", views.eval_progress, name="eval_progress"),
    path("<str:eval_id>/export.csv", views.eval_export_csv, name="eval_export_csv"),
    path("<str:eval_id>/export.jsonl", views.eval_export_jsonl, name="eval_export_jsonl"),
    path("<str:eval_id>/runs/<str:run_id>/cancel/", views.eval_run_cancel, name="eval_run_cancel"),
    path("<str:eval_id>/runs/<str:run_id>/resume/", views.eval_run_resume, name="eval_run_resume"),
]
