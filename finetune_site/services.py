from django.db import transaction

from .models import Notification, NotificationSettings


def notify(
    user, message: str, *, level: str = "info", link: str = "", event: str = "", data: dict | None = None
) -> Notification:
    """Leave an in-app notice for user, and send it by email and webhook where they asked for it."""
    notice = Notification.objects.create(user=user, message=message[:500], level=level, link=link)
    prefs = NotificationSettings.objects.filter(user=user).first()
    if prefs is None:
        return notice
    from .tasks import deliver_webhook, send_notification_email

    if prefs.webhook_url:
        payload = {
            "event": event or "notification",
            "message": message,
            "level": level,
            "link": link,
            "created_at": int(notice.created_at.timestamp()),
            "data": data or {},
        }
        transaction.on_commit(lambda: deliver_webhook.delay(prefs.webhook_url, payload, prefs.webhook_secret))
    if prefs.email_enabled and user.email:
        transaction.on_commit(
            lambda: send_notification_email.delay(user.email, f"[Finetune Console] {message[:80]}", message)
        )
    return notice
