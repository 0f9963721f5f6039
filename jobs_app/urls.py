from django.urls import path

from . import views

urlpatterns = [
    path("", views.job_list, name="job_list"),
    path("new/", views.job_create, name="job_create"),
    path("estimate/", views.job_estimate, name="job_estimate"),
    path("compare/", views.job_compare, name="job_compare"),
    path("<str:public_id>/", views.job_detail, name="job_detail"),
    path("<str:public_id>/events/", views.job_events, name="job_events"),
    path("<str:public_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("<str:public_id>/pause/", views.job_pause, name="job_pause"),
    path("<str:public_id>/resume/", views.job_resume, name="job_resume"),
    path("<str:public_id>/retry/", views.job_retry, name="job_retry"),
    path("<str:public_id>/metrics.csv", views.job_metrics_csv, name="job_metrics_csv"),
    path("<str:public_id>/log.txt", views.job_log, name="job_log"),
]
