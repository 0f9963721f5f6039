from django.apps import AppConfig


class FinetuneSiteConfig(AppConfig):
    name = "finetune_site"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.contrib.auth.signals import user_logged_out

        from . import schema  # noqa: F401  (registers the API-key scheme)

        user_logged_out.connect(_say_logged_out, dispatch_uid="finetune-logged-out")


def _say_logged_out(sender, request, user, **kwargs):
    from django.contrib import messages

    # Stored in the messages cookie, which outlives the session that logout() flushes next.
    if request is not None and user is not None:
        messages.info(
            request, "You have logged out.", fail_silently=True
        )  # a request without the middleware (tests, scripts)
