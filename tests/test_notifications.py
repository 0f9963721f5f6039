"""Notifications: the bell, and signed webhooks that are retried until the receiver accepts."""

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.contrib.auth import get_user_model

from finetune_site.models import Notification, NotificationSettings
from finetune_site.services import notify
from finetune_site.tasks import deliver_webhook

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver():
    """A local HTTP server that fails the first request and records every one."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) == 1 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_a_failed_delivery_is_retried_and_the_signature_verifies(receiver, settings):
    settings.FT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]  # the test's receiver is local
    url, received = receiver
    result = deliver_webhook.apply(
        args=(url, {"event": "fine_tuning.job.succeeded", "data": {"id": "ftjob-1"}}, "s3cret")
    )
    assert result.successful() and len(received) == 2
    headers, body = received[-1]
    expected = hmac.new(b"s3cret", headers["X-Finetune-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Finetune-Signature"] == f"sha256={expected}"
    assert json.loads(body)["data"]["id"] == "ftjob-1"


def test_notify_rings_the_bell_and_queues_the_webhook(client, django_capture_on_commit_callbacks, monkeypatch):
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    NotificationSettings.objects.create(user=alice, webhook_url="http://127.0.0.1:9/hook", webhook_secret="k")
    queued = []
    monkeypatch.setattr("finetune_site.tasks.deliver_webhook.delay", lambda *args: queued.append(args))
    with django_capture_on_commit_callbacks(execute=True):
        notify(alice, "Job ftjob-1 succeeded.", event="fine_tuning.job.succeeded")
    assert queued and queued[0][0] == "http://127.0.0.1:9/hook" and queued[0][1]["event"] == "fine_tuning.job.succeeded"
    client.force_login(alice)
    assert 'data-testid="unread">1<' in client.get("/").content.decode()
    assert "new</span>" in client.get("/notifications/").content.decode()  # shown as new once, then seen
    assert not Notification.objects.filter(user=alice, read_at__isnull=True).exists()
    assert 'data-testid="unread"' not in client.get("/").content.decode()


def test_email_notices_go_to_the_address_set_on_the_page(
    client, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from django.core import mail

    from finetune_site.tasks import send_notification_email

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(alice)
    refused = client.post("/notifications/", {"email_enabled": "on", "email": ""})
    assert "Give the address" in refused.content.decode()
    client.post("/notifications/", {"email_enabled": "on", "email": "alice@example.org"})
    alice.refresh_from_db()
    assert alice.email == "alice@example.org" and alice.notification_settings.email_enabled

    sent = []
    monkeypatch.setattr("finetune_site.tasks.send_notification_email.delay", lambda *args: sent.append(args))
    with django_capture_on_commit_callbacks(execute=True):
        notify(alice, "Job ftjob-1 failed.", level="error")
    assert sent and sent[0][0] == "alice@example.org"
    send_notification_email.apply(args=sent[0])
    assert mail.outbox[-1].to == ["alice@example.org"] and "ftjob-1" in mail.outbox[-1].subject


def test_viewing_notifications_marks_only_the_ones_shown_as_seen(client):
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    for i in range(52):
        Notification.objects.create(user=alice, message=f"Job {i} succeeded.")
    client.force_login(alice)
    client.get("/notifications/")
    assert Notification.objects.filter(user=alice, read_at__isnull=True).count() == 2  # the page shows 50
