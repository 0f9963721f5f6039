from django.apps import AppConfig


class FinetuneSiteConfig(AppConfig):
    name = "finetune_site"
    default_auto_field = "django.db.models.BigAutoField"
