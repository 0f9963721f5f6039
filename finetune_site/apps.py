from django.apps import AppConfig


class FinetuneSiteConfig(AppConfig):
    name = "finetune_site"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import schema  # noqa: F401  (registers the API-key scheme)
