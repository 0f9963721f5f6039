"""Pages of the model catalog, deployments and the playground (their APIs are routed in finetune_site.urls)."""

from django.urls import path

from .catalog import views as catalog_views
from .deployments import views as deployment_views
from .playground import views as playground_views

urlpatterns = [
    path("models/", catalog_views.model_list, name="model_list"),
    path("models/<path:model_id>/delete/", catalog_views.model_delete, name="model_delete"),
    path("models/<path:model_id>/download/adapter.zip", catalog_views.download_adapter, name="model_download_adapter"),
    path("models/<path:model_id>/download/merged.zip", catalog_views.download_merged, name="model_download_merged"),
    path("models/<path:model_id>/merge/", catalog_views.model_merge, name="model_merge"),
    path("models/<path:model_id>/gguf/<str:quant>/", catalog_views.model_gguf, name="model_gguf"),
    path("models/<path:model_id>/download/<str:quant>.gguf", catalog_views.download_gguf, name="model_download_gguf"),
    path(
        "models/<path:model_id>/download/<str:quant>/Modelfile",
        catalog_views.download_modelfile,
        name="model_download_modelfile",
    ),
    path("models/<path:model_id>/exports/", catalog_views.model_exports, name="model_exports"),
    path("deployments/", deployment_views.deployment_list, name="deployment_list"),
    path("deployments/<str:deployment_id>/", deployment_views.deployment_detail, name="deployment_detail"),
    path("deployments/<str:deployment_id>/scale/", deployment_views.deployment_scale, name="deployment_scale"),
    path("deployments/<str:deployment_id>/cancel/", deployment_views.deployment_cancel, name="deployment_cancel"),
    path("playground/", playground_views.playground, name="playground"),
    path("playground/sample/", playground_views.sample, name="playground_sample"),
    path("playground/template/", playground_views.rendered_template, name="playground_template"),
    path("playground/batch/", playground_views.batch_compare, name="playground_batch"),
]
