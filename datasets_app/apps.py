from django.apps import AppConfig


class DatasetsAppConfig(AppConfig):
    name = "datasets_app"
    default_auto_field = "django.db.models.BigAutoField"
