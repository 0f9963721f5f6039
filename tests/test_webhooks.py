"""Webhook deliveries are safe to point anywhere: public hosts only, pinned, no redirects, one deadline."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.contrib.auth import get_user_model

from finetune_site.models import NotificationSettings
from finetune_site.webhooks import DeliveryFailed, UnsafeWebhookURL, check_url, deliver


class Receiver:
    """A local HTTP server answering each POST with what `answer` says; it records every request."""

    def __init__(self, answer):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, dict(self.headers), body))
                answer(self)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def receiver():
    def ok(handler):
        handler.send_response(204)
        handler.end_headers()

    server = Receiver(ok)
    yield server
    server.server.shutdown()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/hook", "Only http:// and https://"),
        ("http://127.0.0.1:9/hook", "127.0.0.1"),
        ("http://localhost:9/hook", "127.0.0.1"),
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://192.168.0.10/hook", "192.168.0.10"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::1]:9/hook", "::1"),
        ("http://[::ffff:127.0.0.1]:9/hook", "127.0.0.1"),
        ("http://0.0.0.0:9/hook", "0.0.0.0"),
        ("http://224.0.0.1/hook", "224.0.0.1"),
        ("http://example.com:99999/hook", "port"),
    ],
)
def test_it_refuses_urls_that_point_inside_before_connecting(url, why):
    with pytest.raises(UnsafeWebhookURL, match=why.replace(".", r"\.").replace("[", r"\[")):
        deliver(url, {"event": "x"}, "secret")


def test_a_trusted_internal_receiver_can_be_allowed_by_name_address_or_network(receiver):
    for allowed in (["127.0.0.1"], ["127.0.0.0/8"], ["localhost"]):
        host = "localhost" if allowed == ["localhost"] else "127.0.0.1"
        assert deliver(receiver.url(host), {"event": "x"}, "secret", allowed=allowed) == 204
    assert len(receiver.received) == 3
    with pytest.raises(UnsafeWebhookURL):  # allowing one network does not allow another
        check_url("http://10.0.0.1/hook", allowed=["127.0.0.0/8"])


def test_the_connection_goes_to_the_address_that_was_checked(receiver, monkeypatch):
    lookups = []
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        # DNS is the outer edge: the first answer is checked; a second one would point elsewhere.
        if host == "hooks.example.test":
            lookups.append(host)
            answer = "127.0.0.1" if len(lookups) == 1 else "192.0.2.1"
            return real(answer, *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert deliver(receiver.url("hooks.example.test"), {"event": "x"}, "s", allowed=["hooks.example.test"]) == 204
    assert lookups == ["hooks.example.test"]
    _, headers, _ = receiver.received[0]
    assert headers["Host"] == f"hooks.example.test:{receiver.port}"


def test_redirects_are_not_followed():
    def moved(handler):
        handler.send_response(302)
        handler.send_header("Location", "http://127.0.0.1:9/elsewhere")
        handler.end_headers()

    server = Receiver(moved)
    try:
        with pytest.raises(DeliveryFailed, match="302: webhook redirects are not followed"):
            deliver(server.url(), {"event": "x"}, "s", allowed=["127.0.0.1"])
        assert [path for path, _, _ in server.received] == ["/hook"]
    finally:
        server.server.shutdown()


def test_one_deadline_covers_a_receiver_that_trickles_its_answer():
    def trickle(handler):
        # Each byte comes well within any per-read timeout; the whole answer takes 6 s.
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:  # the deliverer gave up: good
                return
            time.sleep(6 / 38)

    server = Receiver(trickle)
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="did not answer within 1 s"):
            deliver(server.url(), {"event": "x"}, "s", allowed=["127.0.0.1"], deadline=1.0)
        assert time.monotonic() - started < 3
    finally:
        server.server.shutdown()


@pytest.mark.django_db
def test_the_notifications_page_refuses_an_internal_webhook_url(client):
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(alice)
    response = client.post("/notifications/", {"webhook_url": "http://169.254.169.254/latest/meta-data/"})
    assert response.status_code == 200
    assert "not a public address" in response.content.decode()
    assert not NotificationSettings.objects.filter(user=alice).exclude(webhook_url="").exists()
