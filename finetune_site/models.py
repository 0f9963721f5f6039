import hashlib
import hmac
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


def _key_secret(key_id: str) -> str:
    # The secret half is derived from SECRET_KEY, so the server can check the
    # HS256 tokens zhipuai signs with it while storing only a hash of the key.
    digest = hmac.new(settings.SECRET_KEY.encode(), f"api-key:{key_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:40]


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A key for the HTTP API: `<key_id>.<secret>`, shown once, stored hashed."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    key_id = models.CharField(max_length=32, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.key_id} ({self.user})"

    @classmethod
    def issue(cls, user, name: str = "") -> tuple["ApiKey", str]:
        """Create a key for user; return it with the raw key, which is never stored."""
        key_id = "ftk" + secrets.token_hex(8)
        raw = f"{key_id}.{_key_secret(key_id)}"
        return cls.objects.create(user=user, name=name, key_id=key_id, key_hash=hash_key(raw)), raw

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @property
    def secret(self) -> str:
        return _key_secret(self.key_id)

    def matches(self, raw_key: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_key(raw_key))

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])


class Notification(models.Model):
    """An in-app notice for one user (job finished, job failed, ...)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    created_at = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=10, default="info")
    message = models.CharField(max_length=500)
    link = models.CharField(max_length=300, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]


class NotificationSettings(models.Model):
    """Where a user wants job notices besides the bell: email and a signed webhook."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_settings"
    )
    email_enabled = models.BooleanField(default=False)
    webhook_url = models.URLField(blank=True, max_length=500)
    webhook_secret = models.CharField(max_length=64, default=secrets.token_hex)

    def __str__(self):
        return f"notification settings of {self.user}"
