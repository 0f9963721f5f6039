"""The access log: one JSON line per HTTP request, on the logger `finetune_site.access`.

Each line says when, what (method, the URL pattern's route and the path), the status, how
long it took, who (user id, or "anonymous"; the API key's id when one was sent) and from
where. It never holds the Authorization header, cookies, the query string or a body: the
key's id is the public half of `<key_id>.<secret>` (or the `api_key` claim of a zhipuai
token), read only when it has the shape of one.

A streaming response (chat over SSE, file downloads) is logged when it is returned, before
its body is sent: `"streaming": true`, and `duration_ms` is the time until its headers were ready.
uvicorn's own access log is off (runstack), so this is the only one.
"""

import json
import logging
import re
import time
from datetime import UTC, datetime

import jwt
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.utils.functional import SimpleLazyObject, empty

logger = logging.getLogger("finetune_site.access")

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class AccessLogMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        started = time.monotonic()
        response = self.get_response(request)
        log_request(request, response, started)
        return response

    async def _acall(self, request):
        started = time.monotonic()
        response = await self.get_response(request)
        log_request(request, response, started)
        return response


def log_request(request, response, started: float) -> None:
    """Write the access line for a request answered with response; started is its time.monotonic()."""
    match = getattr(request, "resolver_match", None)
    line = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "method": request.method,
        "route": match.route if match else None,
        "path": request.path,
        "status": response.status_code,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
        "user": user_id(request),
        "key": api_key_id(request.META.get("HTTP_AUTHORIZATION", "")),
        "client": request.META.get("REMOTE_ADDR"),
    }
    if response.streaming:
        line["streaming"] = True
    logger.info(json.dumps(line))


def user_id(request) -> int | str:
    """The signed-in user's id, or "anonymous"; never queries the database to find out.

    The session's user is looked up lazily; a request whose view never asked for it
    was served without one. API views set request.user to the key's owner.
    """
    user = getattr(request, "user", None)
    if isinstance(user, SimpleLazyObject) and user._wrapped is empty:
        user = getattr(request, "_acached_user", None)  # an async view's `await request.auser()`
    if user is not None and user.is_authenticated:
        return user.pk
    return "anonymous"


def api_key_id(header: str) -> str | None:
    """The key id an Authorization header names, or None; never any part of a secret."""
    scheme, _, credential = header.strip().partition(" ")
    token = credential.strip() if scheme.lower() == "bearer" else header.strip()
    if token.count(".") == 2:
        try:
            key_id = jwt.decode(token, options={"verify_signature": False}).get("api_key")
        except jwt.PyJWTError:
            return None
    elif token.count(".") == 1:
        key_id = token.split(".", 1)[0]
    else:
        return None  # no `<key_id>.` prefix: the whole token may be a secret
    return key_id if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) else None
