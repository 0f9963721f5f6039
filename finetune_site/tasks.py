"""Celery tasks of notifications; both run on the `notifications` queue's own worker."""

from celery import shared_task
from django.conf import settings

from .webhooks import DeliveryFailed, deliver


@shared_task(
    name="finetune_site.tasks.deliver_webhook",
    autoretry_for=(DeliveryFailed,),
    retry_backoff=2,
    retry_backoff_max=300,
    max_retries=6,
    retry_jitter=False,
)
def deliver_webhook(url: str, payload: dict, secret: str) -> int:
    # An unsafe URL (UnsafeWebhookURL) is not retried: it will not become safe.
    return deliver(url, payload, secret, allowed=settings.FT_WEBHOOK_ALLOWED_HOSTS)


@shared_task(
    name="finetune_site.tasks.send_notification_email", autoretry_for=(OSError,), retry_backoff=5, max_retries=3
)
def send_notification_email(address: str, subject: str, text: str) -> None:
    from django.core.mail import send_mail

    send_mail(subject, text, None, [address])
