"""Refuse a request body that is too large before it is stored, not after.

Django's ASGI handler reads the whole body into a temporary file before any view
runs, so a view's size check comes only after a 5 GB upload has been written to
disk. This wrapper answers as soon as the declared Content-Length is over the
limit, and stops a body without one (chunked) as soon as it passes the limit.

Only a file upload to an upload route (the files API, the console's dataset upload)
from someone signed in (a session, or on the API a valid key or zhipuai token) may be
FT_MAX_UPLOAD_BYTES plus room for the form around the file. The credentials are
checked here, before a byte of the body is read, so that nobody can make the server
write a gigabyte to disk without an account. Every other body may be
DATA_UPLOAD_MAX_MEMORY_SIZE, the limit Django applies to it anyway; an upload over it
without credentials is answered 401, anything else over it 413.
"""

import json
import logging
from enum import Enum
from importlib import import_module
from types import SimpleNamespace

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib import auth
from django.db import DatabaseError
from django.http.cookie import parse_cookie
from django.urls import Resolver404, resolve
from django.urls import reverse as url_of
from rest_framework import exceptions

from datasets_app.api import FileListCreate
from datasets_app.views import dataset_upload

from .api_errors import error_body
from .auth import authenticate_api_key
from .units import human_bytes

log = logging.getLogger(__name__)

FORM_ROOM = 1024 * 1024
API_PREFIXES = ("/v1/", "/api/")


class Body(Enum):
    UPLOAD = "an authenticated upload"
    ANONYMOUS_UPLOAD = "an upload without valid credentials"
    OTHER = "any other body"


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def upload_route(path: str) -> str | None:
    """ "api" or "page" when path is a route that takes file uploads, else None."""
    try:
        view = resolve(path).func
    except Resolver404:
        return None
    if getattr(view, "view_class", None) is FileListCreate:
        return "api"
    if view is dataset_upload:
        return "page"
    return None


def _credentials_problem(scope, route: str) -> str | None:
    """Why this request's credentials do not let it upload, or None when they do (reads the database)."""
    authorization = _header(scope, b"authorization")
    if route == "api" and authorization:
        try:
            authenticate_api_key(authorization)
        except exceptions.AuthenticationFailed as failed:
            return str(failed.detail)
        return None
    session_key = parse_cookie(_header(scope, b"cookie")).get(settings.SESSION_COOKIE_NAME)
    if session_key:
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        if auth.get_user(SimpleNamespace(session=store)).is_authenticated:
            return None
        return "Your session has ended."
    if route == "api":
        return "Missing API key in the Authorization header."
    return "You are not signed in."


async def _limit(scope) -> tuple[int | None, Body, str | None]:
    """(the most bytes this request's body may have or None, what kind of body it is, why credentials failed)."""
    small = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if not _header(scope, b"content-type").lower().startswith("multipart/form-data"):
        return small, Body.OTHER, None
    route = upload_route(scope.get("path", ""))
    if route is None:
        return small, Body.OTHER, None
    try:
        problem = await database_sync_to_async(_credentials_problem)(scope, route)
    except DatabaseError:  # cannot tell who is asking: no large body, and the reason says it is passing
        log.warning("credentials of an upload not checked", exc_info=True)
        problem = "Your credentials could not be checked just now (the database did not answer); send it again."
    if problem is None:
        return settings.FT_MAX_UPLOAD_BYTES + FORM_ROOM, Body.UPLOAD, None
    return small, Body.ANONYMOUS_UPLOAD, problem


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, kind, problem = await _limit(scope)
        if limit is None:
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(scope, send, int(declared), limit, kind, problem)

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
            await _refuse(scope, send, received, limit, kind, problem, at_least=True)


async def _refuse(
    scope, send, size: int, limit: int, kind: Body, problem: str | None, *, at_least: bool = False
) -> None:
    api = scope.get("path", "").startswith(API_PREFIXES)
    size_text = f"{'more than ' if at_least else ''}{human_bytes(size)}"
    if kind is Body.ANONYMOUS_UPLOAD:
        status, code, param = 401, "authentication_failed", None
        who = "a valid API key" if api else "signing in"
        message = (
            f"{problem} An upload of {size_text} needs {who}; without it the limit is {human_bytes(limit)} "
            "(DATA_UPLOAD_MAX_MEMORY_SIZE). Nothing was stored."
        )
        title = "Sign in to upload"
    elif kind is Body.UPLOAD:
        status, code, param = 413, "file_too_large", "file"
        message = (
            f"The upload is {size_text}, over the limit of {human_bytes(settings.FT_MAX_UPLOAD_BYTES)} "
            "(FT_MAX_UPLOAD_BYTES); nothing was stored."
        )
        title = "Too large"
    else:
        status, code, param = 413, "request_too_large", None
        message = (
            f"The request body is {size_text}, over the limit of {human_bytes(limit)} "
            "(DATA_UPLOAD_MAX_MEMORY_SIZE); nothing was stored."
        )
        title = "Too large"
    headers = [(b"connection", b"close")]
    if api:
        body = json.dumps(error_body(message, status_code=status, param=param, code=code)).encode()
        headers.append((b"content-type", b"application/json"))
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="api"'))
    else:
        sign_in = f' <a href="{url_of("login")}">Sign in</a>.' if status == 401 else ""
        body = (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title} · Finetune Console</title>'
            f'<link rel="stylesheet" href="{settings.STATIC_URL}css/app.css"></head><body><main><section class="card">'
            f'<h1>{title}</h1><p class="flash error">{message}</p><p><a href="javascript:history.back()">Go back</a>.'
            f"{sign_in}</p></section></main></body></html>"
        ).encode()
        headers.append((b"content-type", b"text/html; charset=utf-8"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
