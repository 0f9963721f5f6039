"""Oversized bodies are refused before they are stored: at the ASGI application the server runs.

Only a signed-in upload to an upload route may be large; anyone else is refused after
at most the small limit (DATA_UPLOAD_MAX_MEMORY_SIZE) has been read.
"""

import asyncio
import json
import time

import jwt
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from datasets_app.models import Dataset
from finetune_site.asgi import application
from finetune_site.models import ApiKey

from .live import chat_lines

pytestmark = pytest.mark.django_db(transaction=True)
MIB = 1024 * 1024
BOUNDARY = "ftboundary"


def call(path: str, headers: dict, chunks: list[bytes], method: str = "POST"):
    """Run one request through the ASGI app; (status, headers, body, how many body chunks it read)."""
    pending = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ]
    read, sent = [], []

    async def receive():
        if pending:
            read.append(pending[0])
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client waits for the answer

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(application(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, len(read)


def multipart(content: bytes, *, filename: str = "train.jsonl") -> list[bytes]:
    """A files-API form (purpose + file) cut into 1 MiB chunks, as a client would stream it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + content + f"\r\n--{BOUNDARY}--\r\n".encode()
    return [body[i : i + MIB] for i in range(0, len(body), MIB)]


FORM = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def alice_key(alice):
    return ApiKey.issue(alice, name="test")[1]


@pytest.fixture
def alice_browser(alice, settings):
    """Cookie and CSRF headers of alice's signed-in browser."""
    browser = Client()
    browser.force_login(alice)
    browser.get("/datasets/")
    session = browser.cookies[settings.SESSION_COOKIE_NAME].value
    csrf = browser.cookies[settings.CSRF_COOKIE_NAME].value
    return {
        "cookie": f"{settings.SESSION_COOKIE_NAME}={session}; {settings.CSRF_COOKIE_NAME}={csrf}",
        "x-csrftoken": csrf,
    }


@pytest.fixture
def storage(settings, tmp_path, monkeypatch):
    """Uploads land under tmp_path; what would be queued for validation is recorded (no broker here)."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "spool")
    (tmp_path / "spool").mkdir()
    from datasets_app.tasks import validate_dataset

    queued = []
    monkeypatch.setattr(validate_dataset, "delay", queued.append)
    return tmp_path


def stored_files(tmp_path) -> list:
    return [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_declared_oversized_upload_is_refused_without_reading_it(settings, alice_key):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/v1/files",
        {**FORM, "content-length": str(5 * MIB), "authorization": f"Bearer {alice_key}"},
        [b"x" * MIB] * 5,
    )
    error = json.loads(body)["error"]
    assert (status, read) == (413, 0)
    assert error["code"] == "file_too_large" and error["param"] == "file"
    assert "5.0 MB, over the limit of 1000 bytes (FT_MAX_UPLOAD_BYTES)" in error["message"]


def test_an_upload_without_a_length_is_stopped_once_it_passes_the_limit(settings, alice_key):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/v1/files", {**FORM, "authorization": f"Bearer {alice_key}"}, [b"x" * (MIB // 2)] * 8
    )
    assert status == 413 and read == 3  # 1.5 MiB read: past 1000 bytes + 1 MiB for the form, the rest never
    assert "more than 1.5 MB" in json.loads(body)["error"]["message"]


def test_an_oversized_json_body_gets_the_api_error_shape():
    status, headers, body, read = call(
        "/v1/chat/completions", {"content-type": "application/json", "content-length": str(11 * MIB)}, [b"{}"]
    )
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "request_too_large" and "DATA_UPLOAD_MAX_MEMORY_SIZE" in error["message"]


def test_a_page_upload_gets_a_page_that_says_why(settings, alice_browser):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/datasets/upload/", {**FORM, **alice_browser, "content-length": str(2 * MIB)}, [b""]
    )
    assert status == 413 and headers[b"content-type"].startswith(b"text/html")
    assert "over the limit of 1000 bytes" in body.decode() and "nothing was stored" in body.decode()


def test_bodies_within_the_limit_reach_django(settings):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call("/v1/files", {**FORM, "content-length": str(MIB)}, [b"x" * (MIB // 2)] * 2)
    assert status == 401 and read == 2  # read whole, and answered by the API (no key given)
    status, *_ = call("/accounts/login/", {}, [b""], method="GET")
    assert status == 200


# --- Finding 9: limits before authentication


@pytest.mark.parametrize("path", ["/v1/files", "/api/paas/v4/files"])
def test_an_upload_without_a_key_is_refused_after_the_small_limit(settings, storage, path):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * MIB
    status, headers, body, read = call(path, FORM, multipart(b"x" * 20 * MIB))
    error = json.loads(body)["error"]
    assert status == 401 and read == 3  # 3 MiB read: past the 2 MiB an anonymous body may have, the rest never
    assert headers[b"www-authenticate"] == b'Bearer realm="api"'
    assert error["type"] == "authentication_error" and "Missing API key" in error["message"]
    assert "needs a valid API key" in error["message"] and "Nothing was stored" in error["message"]
    assert stored_files(storage) == [] and not Dataset.objects.exists()


def test_a_declared_upload_with_a_wrong_key_is_refused_unread(settings, storage, alice_key):
    forged = alice_key[:-4] + "abcd"
    status, headers, body, read = call(
        "/v1/files",
        {**FORM, "content-length": str(500 * MIB), "authorization": f"Bearer {forged}"},
        [b"x" * MIB] * 3,
    )
    assert (status, read) == (401, 0)
    assert "Incorrect API key provided." in json.loads(body)["error"]["message"]


def test_a_large_multipart_body_to_any_other_route_is_refused_even_with_a_key(settings, storage, alice_key):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * MIB
    for path in ("/v1/chat/completions", "/accounts/login/", "/datasets/", "/no/such/page"):
        status, headers, body, read = call(
            path, {**FORM, "authorization": f"Bearer {alice_key}"}, multipart(b"x" * 20 * MIB)
        )
        assert status == 413 and read == 3, path
        assert b"over the limit of 2.0 MB (DATA_UPLOAD_MAX_MEMORY_SIZE)" in body, path
    assert stored_files(storage) == []


def test_a_page_upload_without_a_session_is_asked_to_sign_in(settings, storage):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * MIB
    status, headers, body, read = call("/datasets/upload/", FORM, multipart(b"x" * 20 * MIB))
    page = body.decode()
    assert status == 401 and read == 3 and headers[b"content-type"].startswith(b"text/html")
    assert "You are not signed in." in page and 'href="/accounts/login/"' in page
    assert stored_files(storage) == [] and not Dataset.objects.exists()


def test_an_ended_or_made_up_session_cannot_upload_more_than_the_small_limit(settings, storage, alice_browser):
    from django.contrib.sessions.models import Session

    made_up = {**FORM, "cookie": f"{settings.SESSION_COOKIE_NAME}=madeup1234567890abcdef"}
    status, headers, body, read = call("/datasets/upload/", {**made_up, "content-length": str(20 * MIB)}, [b""])
    assert (status, read) == (401, 0) and "Your session has ended." in body.decode()
    Session.objects.all().delete()  # alice signed out (or her session expired)
    status, headers, body, read = call(
        "/datasets/upload/", {**FORM, **alice_browser, "content-length": str(20 * MIB)}, multipart(b"x" * 20 * MIB)
    )
    assert (status, read) == (401, 0) and "Your session has ended." in body.decode()


def test_a_signed_in_upload_over_the_small_limit_is_taken(settings, storage, alice, alice_key, alice_browser):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = MIB
    content = chat_lines(12000)
    chunks = multipart(content)
    form = {**FORM, "content-length": str(sum(map(len, chunks)))}
    assert len(content) > 2 * MIB
    status, headers, body, read = call("/v1/files", {**form, "authorization": f"Bearer {alice_key}"}, chunks)
    assert status == 200, body
    assert json.loads(body)["bytes"] == len(content)

    key_id, secret = alice_key.split(".")
    now_ms = int(time.time() * 1000)
    token = jwt.encode({"api_key": key_id, "exp": now_ms + 60_000, "timestamp": now_ms}, secret, algorithm="HS256")
    status, headers, body, read = call("/api/paas/v4/files", {**form, "authorization": token}, chunks)
    assert status == 200, body

    status, headers, body, read = call("/datasets/upload/", {**form, **alice_browser}, chunks)
    assert status == 302, body
    uploads = Dataset.objects.filter(owner=alice)
    assert uploads.count() == 3 and {d.bytes for d in uploads} == {len(content)}
    assert list((storage / "spool").iterdir()) == []  # the spooled copies went with their requests
