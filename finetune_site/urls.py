from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from datasets_app import api as files_api
from deployments_app.catalog import api as models_api
from deployments_app.chat import api_router as chat_api
from deployments_app.deployments import api as deployments_api
from evals_app import api as evals_api
from jobs_app import api as jobs_api

from . import apiviews, login_throttle, metrics, views

# The same API under /v1/ (openai) and /api/paas/v4/ (zhipuai); no trailing
# slashes, and model ids may hold '/' and ':'.
api_patterns = [
    path("files", files_api.FileListCreate.as_view()),
    path("files/<str:file_id>", files_api.FileDetail.as_view()),
    path("files/<str:file_id>/content", files_api.file_content),
    path("files/<str:file_id>/split", files_api.FileSplit.as_view()),
    path("files/<str:file_id>/dedupe", files_api.FileDedupe.as_view()),
    path("fine_tuning/jobs", jobs_api.JobListCreate.as_view()),
    path("fine_tuning/jobs/<str:job_id>", jobs_api.JobDetail.as_view()),
    path("fine_tuning/jobs/<str:job_id>/cancel", jobs_api.JobCancel.as_view()),
    path("fine_tuning/jobs/<str:job_id>/pause", jobs_api.JobPause.as_view()),
    path("fine_tuning/jobs/<str:job_id>/resume", jobs_api.JobResume.as_view()),
    path("fine_tuning/jobs/<str:job_id>/events", jobs_api.JobEvents.as_view()),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", jobs_api.JobCheckpoints.as_view()),
    path("fine_tuning/fine_tuned_models/<path:model>", models_api.FineTunedModelDelete.as_view()),
    path("models", models_api.ModelList.as_view()),
    path("models/<path:model>", models_api.ModelDetail.as_view()),
    path("chat/completions", chat_api.chat_completions),
    path("evals", evals_api.EvalListCreate.as_view()),
    path("evals/<str:eval_id>", evals_api.EvalDetail.as_view()),
    path("evals/<str:eval_id>/runs", evals_api.RunListCreate.as_view()),
    path("evals/<str:eval_id>/runs/<str:run_id>", evals_api.RunDetail.as_view()),
    path("evals/<str:eval_id>/runs/<str:run_id>/cancel", evals_api.RunCancel.as_view()),
    path("evals/<str:eval_id>/runs/<str:run_id>/resume", evals_api.RunResume.as_view()),
    path("evals/<str:eval_id>/runs/<str:run_id>/output_items", evals_api.OutputItemList.as_view()),
    path("evals/<str:eval_id>/runs/<str:run_id>/output_items/<str:item_id>", evals_api.OutputItemDetail.as_view()),
    # Last: an endpoint we lack (embeddings, responses, ...) answers in the API's error shape.
    re_path(r"^(?P<rest>.*)$", apiviews.unsupported_endpoint),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics, name="metrics"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(authentication_form=login_throttle.ThrottledAuthenticationForm),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("keys/", views.api_keys, name="api_keys"),
    path("keys/<int:key_pk>/revoke/", views.api_key_revoke, name="api_key_revoke"),
    path("notifications/", views.notifications, name="notifications"),
    path("datasets/", include("datasets_app.urls")),
    path("jobs/", include("jobs_app.urls")),
    path("", include("deployments_app.urls")),
    path("evals/", include("evals_app.urls")),
    path("admin/", admin.site.urls),
    path("api/deployments", deployments_api.DeploymentListCreate.as_view(), name="api_deployments"),
    path("api/deployments/<str:deployment_id>", deployments_api.DeploymentDetail.as_view(), name="api_deployment"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # Pages for people: without a session they send them to the login page (the schema answers 401).
    # Redoc to read; Swagger UI to try calls (Authorize with an API key, or the session of the page).
    path("api/docs/", login_required(SpectacularRedocView.as_view(url_name="schema")), name="api_docs"),
    path("api/docs/swagger/", login_required(SpectacularSwaggerView.as_view(url_name="schema")), name="api_swagger"),
    path("v1/", include(api_patterns)),
    path("api/paas/v4/", include(api_patterns)),
]
