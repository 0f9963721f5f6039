import logging
import threading
import time

import redis
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from datasets_app.selectors import datasets_for
from deployments_app.models import ModelCard
from jobs_app.selectors import jobs_for

from .celery import app as celery_app
from .models import ApiKey, Notification, NotificationSettings
from .webhooks import DeliveryFailed, UnsafeWebhookURL, check_url

log = logging.getLogger(__name__)
QUEUES = ("training", "default", "serving", "notifications", "housekeeping")


@login_required
def home(request):
    context = {
        "jobs": jobs_for(request.user)[:8],
        "dataset_count": datasets_for(request.user).count(),
        "job_count": jobs_for(request.user).count(),
        "model_count": ModelCard.objects.owned_by(request.user).count(),
    }
    return render(request, "home.html", context)


def _check_redis() -> str | None:
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_WORKER_COUNTS_SECONDS = 5.0
"""How long one census of the workers answers /healthz: each census is a broadcast to every worker."""
_worker_counts: tuple[float, dict[str, int]] | None = None
_worker_counts_lock = threading.Lock()


def _workers_per_queue() -> dict[str, int]:
    global _worker_counts
    with _worker_counts_lock:  # one census at a time; the callers meanwhile share its answer
        if _worker_counts is None or time.monotonic() - _worker_counts[0] > _WORKER_COUNTS_SECONDS:
            _worker_counts = (time.monotonic(), _count_workers())
        return dict(_worker_counts[1])


def _count_workers() -> dict[str, int]:
    replies = celery_app.control.inspect(timeout=1.0).active_queues() or {}
    counts = {queue: 0 for queue in QUEUES}
    for queues in replies.values():
        for queue in queues:
            counts[queue["name"]] = counts.get(queue["name"], 0) + 1
    return counts


def healthz(request):
    """Health of the database, Redis and each worker queue; 503 naming what is down.

    Anyone (a load balancer, a monitor) gets the status and what is down; the details
    (error texts, worker counts, the database vendor) are for staff only.
    """
    report, down = {}, []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        report["database"] = {"ok": True, "vendor": connection.vendor}
    except DatabaseError as exc:
        report["database"] = {"ok": False, "error": str(exc)}
        down.append("database")
    redis_error = _check_redis()
    report["redis"] = {"ok": redis_error is None, **({"error": redis_error} if redis_error else {})}
    if redis_error:
        down.append("redis")
        report["queues"] = {queue: {"workers": 0} for queue in QUEUES}
    else:
        counts = _workers_per_queue()
        report["queues"] = {queue: {"workers": n} for queue, n in counts.items()}
        down += [f"queue:{queue}" for queue in QUEUES if counts.get(queue, 0) == 0]
    report["status"] = "ok" if not down else "down"
    report["down"] = down
    if not (request.user.is_authenticated and request.user.is_staff):
        report = {"status": report["status"], "down": down}
    return JsonResponse(report, status=200 if not down else 503)


@login_required
def api_keys(request):
    new_key = None
    if request.method == "POST":
        name = request.POST.get("name", "").strip()[:100]
        _, new_key = ApiKey.issue(request.user, name=name)
    keys = ApiKey.objects.filter(user=request.user)
    return render(
        request, "api_keys.html", {"keys": keys, "new_key": new_key, "base_url": request.build_absolute_uri("/v1")}
    )


@login_required
@require_POST
def api_key_revoke(request, key_pk):
    key = get_object_or_404(ApiKey, pk=key_pk, user=request.user)
    key.revoke()
    messages.success(request, f"Key {key.key_id} revoked.")
    return redirect("api_keys")


class NotificationSettingsForm(forms.ModelForm):
    email = forms.EmailField(required=False, label="Email address")
    # A URL typed without a scheme means http, as it always has here (Django 6 would assume https).
    webhook_url = forms.URLField(
        required=False, max_length=500, assume_scheme="http", label="Webhook URL (JSON POST, signed)"
    )

    class Meta:
        model = NotificationSettings
        fields = ["email_enabled", "email", "webhook_url"]
        labels = {"email_enabled": "Email me when a job succeeds or fails"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["email"].initial = self.instance.user.email

    def clean_webhook_url(self):
        url = self.cleaned_data["webhook_url"]
        if url:
            # Checked again at each delivery: what a host resolves to can change.
            try:
                check_url(url, allowed=settings.FT_WEBHOOK_ALLOWED_HOSTS)
            except (UnsafeWebhookURL, DeliveryFailed) as refusal:
                raise forms.ValidationError(str(refusal)) from None
        return url

    def clean(self):
        data = super().clean()
        if data.get("email_enabled") and not data.get("email"):
            self.add_error("email", "Give the address to send job notices to.")
        return data

    def save(self, commit=True):
        user = self.instance.user
        if user.email != self.cleaned_data["email"]:
            user.email = self.cleaned_data["email"]
            user.save(update_fields=["email"])
        return super().save(commit)


@login_required
def notifications(request):
    items = list(Notification.objects.filter(user=request.user)[:50])
    prefs, _ = NotificationSettings.objects.get_or_create(user=request.user)
    form = NotificationSettingsForm(request.POST or None, instance=prefs)
    if request.method == "POST":
        if form.is_valid():
            form.save()
            messages.success(request, "Notification settings saved.")
            return redirect("notifications")
    else:
        # The ones shown are seen now: the bell counts only what is not on this page yet,
        # and the page still marks what was new (items were read before this update).
        shown = [n.pk for n in items if n.read_at is None]
        Notification.objects.filter(user=request.user, pk__in=shown).update(read_at=timezone.now())
    return render(request, "notifications.html", {"items": items, "form": form, "prefs": prefs})
