from .models import Notification


def notify(user, message: str, *, level: str = "info", link: str = "") -> Notification:
    """Leave an in-app notice for user (shown under the bell)."""
    return Notification.objects.create(user=user, message=message[:500], level=level, link=link)
