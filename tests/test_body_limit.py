"""Oversized bodies are refused before they are stored: at the ASGI application the server runs."""

import asyncio
import json

import pytest

from finetune_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)
MIB = 1024 * 1024


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


def test_a_declared_oversized_upload_is_refused_without_reading_it(settings):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/v1/files",
        {"content-type": "multipart/form-data; boundary=x", "content-length": str(5 * MIB)},
        [b"x" * MIB] * 5,
    )
    error = json.loads(body)["error"]
    assert (status, read) == (413, 0)
    assert error["code"] == "file_too_large" and error["param"] == "file"
    assert "5.0 MB, over the limit of 1000 bytes (FT_MAX_UPLOAD_BYTES)" in error["message"]


def test_an_upload_without_a_length_is_stopped_once_it_passes_the_limit(settings):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/v1/files", {"content-type": "multipart/form-data; boundary=x"}, [b"x" * (MIB // 2)] * 8
    )
    assert status == 413 and read == 3  # 1.5 MiB read: past 1000 bytes + 1 MiB for the form, the rest never
    assert "more than 1.5 MB" in json.loads(body)["error"]["message"]


def test_an_oversized_json_body_gets_the_api_error_shape():
    status, headers, body, read = call(
        "/v1/chat/completions", {"content-type": "application/json", "content-length": str(11 * MIB)}, [b"{}"]
    )
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "request_too_large" and "DATA_UPLOAD_MAX_MEMORY_SIZE" in error["message"]


def test_a_page_upload_gets_a_page_that_says_why(settings):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/datasets/upload/", {"content-type": "multipart/form-data; boundary=x", "content-length": str(2 * MIB)}, [b""]
    )
    assert status == 413 and headers[b"content-type"].startswith(b"text/html")
    assert "over the limit of 1000 bytes" in body.decode() and "nothing was stored" in body.decode()


def test_bodies_within_the_limit_reach_django(settings):
    settings.FT_MAX_UPLOAD_BYTES = 1000
    status, headers, body, read = call(
        "/v1/files",
        {"content-type": "multipart/form-data; boundary=x", "content-length": str(MIB)},
        [b"x" * (MIB // 2)] * 2,
    )
    assert status == 401 and read == 2  # read whole, and answered by the API (no key given)
    status, *_ = call("/accounts/login/", {}, [b""], method="GET")
    assert status == 200
