"""Who may open a websocket: pages of this very site only.

Channels' AllowedHostsOriginValidator compares the Origin's host name with
ALLOWED_HOSTS and ignores the port, so any other server on the same host
(another instance, a local dev server) could open a logged-in user's live job
stream from its pages. Here the Origin must be this site: the handshake's own
Host, port included, or one of CSRF_TRUSTED_ORIGINS (a proxy in front).
"""

from urllib.parse import urlsplit

from django.conf import settings


class SameOriginValidator:
    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not _same_origin(dict(scope.get("headers") or [])):
            # Refuse the handshake: the first message a websocket app receives is the connect.
            await receive()
            await send({"type": "websocket.close", "code": 4403})
            return None
        return await self.application(scope, receive, send)


def _same_origin(headers: dict[bytes, bytes]) -> bool:
    origin = headers.get(b"origin", b"").decode("latin-1").strip()
    if not origin:
        return True  # not a browser: API clients send no Origin, and cookies are what the check protects
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    parts = urlsplit(origin.lower())
    if parts.netloc and parts.netloc == host:
        return True
    trusted = {urlsplit(entry.lower()).netloc for entry in settings.CSRF_TRUSTED_ORIGINS}
    return parts.netloc in trusted
