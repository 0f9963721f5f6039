from django.apps import AppConfig


class FinetuneSiteConfig(AppConfig):
    name = "finetune_site"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.contrib import admin
        from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed

        from . import (
            login_throttle,
            schema,  # noqa: F401  (registers the API-key scheme)
        )

        user_logged_out.connect(_say_logged_out, dispatch_uid="finetune-logged-out")
        user_login_failed.connect(login_throttle.record_failure, dispatch_uid="finetune-login-failed")
        user_logged_in.connect(login_throttle.clear_failures, dispatch_uid="finetune-logged-in")
        admin.site.login_form = login_throttle.ThrottledAdminAuthenticationForm


def _say_logged_out(sender, request, user, **kwargs):
    from django.contrib import messages

    # Stored in the messages cookie, which outlives the session that logout() flushes next.
    if request is not None and user is not None:
        messages.info(
            request, "You have logged out.", fail_silently=True
        )  # a request without the middleware (tests, scripts)
