from django.apps import AppConfig


class JobsAppConfig(AppConfig):
    name = "jobs_app"
    default_auto_field = "django.db.models.BigAutoField"
