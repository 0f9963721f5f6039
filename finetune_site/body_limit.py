"""Refuse a request body that is too large before it is stored, not after.

Django's ASGI handler reads the whole body into a temporary file before any view
runs, so a view's size check comes only after a 5 GB upload has been written to
disk. This wrapper answers 413 as soon as the declared Content-Length is over the
limit, and stops a body without one (chunked) as soon as it passes the limit.
Multipart bodies (file uploads) may be FT_MAX_UPLOAD_BYTES plus room for the form
around the file; any other body DATA_UPLOAD_MAX_MEMORY_SIZE, the limit Django
applies to it anyway.
"""

import json

from django.conf import settings

from .api_errors import error_body
from .units import human_bytes

FORM_ROOM = 1024 * 1024
API_PREFIXES = ("/v1/", "/api/")


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _limit(scope) -> tuple[int | None, bool]:
    """(the most bytes this request's body may have or None, whether it is a file upload)."""
    if _header(scope, b"content-type").lower().startswith("multipart/form-data"):
        return settings.FT_MAX_UPLOAD_BYTES + FORM_ROOM, True
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE, False


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, upload = _limit(scope)
        if limit is None:
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(scope, send, int(declared), limit, upload)

        received, over, started = 0, False, False

        async def counting_receive():
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # To the app the client is gone: Django abandons the request unread.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, watching_send)
        if over and not started:
            await _refuse(scope, send, received, limit, upload, at_least=True)


async def _refuse(scope, send, size: int, limit: int, upload: bool, *, at_least: bool = False) -> None:
    allowed = settings.FT_MAX_UPLOAD_BYTES if upload else limit
    setting = "FT_MAX_UPLOAD_BYTES" if upload else "DATA_UPLOAD_MAX_MEMORY_SIZE"
    what = "The upload" if upload else "The request body"
    message = (
        f"{what} is {'more than ' if at_least else ''}{human_bytes(size)}, over the limit of "
        f"{human_bytes(allowed)} ({setting}); nothing was stored."
    )
    if scope.get("path", "").startswith(API_PREFIXES):
        body = json.dumps(
            error_body(
                message,
                status_code=413,
                param="file" if upload else None,
                code="file_too_large" if upload else "request_too_large",
            )
        ).encode()
        content_type = b"application/json"
    else:
        body = (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Too large · Finetune Console</title>'
            f'<link rel="stylesheet" href="{settings.STATIC_URL}css/app.css"></head><body><main><section class="card">'
            f'<h1>Too large</h1><p class="flash error">{message}</p><p><a href="javascript:history.back()">Go back</a>'
            f"</p></section></main></body></html>"
        ).encode()
        content_type = b"text/html; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
