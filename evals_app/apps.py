from django.apps import AppConfig


class EvalsAppConfig(AppConfig):
    name = "evals_app"
    default_auto_field = "django.db.models.BigAutoField"
