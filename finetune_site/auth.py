"""API authentication: `Authorization: Bearer <key>`, a bare key, or a zhipuai HS256 token."""

import time
from datetime import timedelta

import jwt
from django.utils import timezone
from rest_framework import authentication, exceptions

from .models import ApiKey

MAX_TOKEN_LIFETIME_SECONDS = 24 * 3600
"""The furthest ahead a signed token's exp may lie: a leaked token is good for a day at most."""
LAST_USED_GRANULARITY = timedelta(minutes=1)
"""last_used_at is written at most this often per key: a write per request would serialise all API calls on SQLite."""


def authenticate_api_key(header: str):
    """Return the user behind an Authorization header value, or raise AuthenticationFailed."""
    scheme, _, credential = header.strip().partition(" ")
    token = credential.strip() if scheme.lower() == "bearer" else header.strip()
    if not token:
        raise exceptions.AuthenticationFailed("Missing API key in the Authorization header.")
    if token.count(".") == 2:
        key = _key_from_jwt(token)
    else:
        key_id = token.split(".", 1)[0]
        key = ApiKey.objects.active().select_related("user").filter(key_id=key_id).first()
        if key is None or not key.matches(token):
            raise exceptions.AuthenticationFailed("Incorrect API key provided.")
    if not key.user.is_active:
        raise exceptions.AuthenticationFailed("This API key's user is disabled.")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_GRANULARITY:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key.user


def _key_from_jwt(token: str) -> ApiKey:
    try:
        key_id = jwt.decode(token, options={"verify_signature": False}).get("api_key", "")
    except jwt.PyJWTError:
        raise exceptions.AuthenticationFailed("Malformed API token.") from None
    key = ApiKey.objects.active().select_related("user").filter(key_id=str(key_id)).first()
    if key is None:
        raise exceptions.AuthenticationFailed("Incorrect API key provided.")
    try:
        # zhipuai puts milliseconds in exp, which PyJWT would read as seconds.
        payload = jwt.decode(token, key.secret, algorithms=["HS256"], options={"verify_exp": False})
    except jwt.PyJWTError:
        raise exceptions.AuthenticationFailed("API token signature does not match the key.") from None
    expires = payload.get("exp")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise exceptions.AuthenticationFailed("API token has no expiry (exp); sign tokens that expire within a day.")
    expires_s = expires / 1000 if expires > 1e11 else expires
    if expires_s < time.time():
        raise exceptions.AuthenticationFailed("API token has expired.")
    if expires_s > time.time() + MAX_TOKEN_LIFETIME_SECONDS:
        raise exceptions.AuthenticationFailed("API token expires too far ahead: sign tokens that expire within a day.")
    return key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        return authenticate_api_key(header), None

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when the key is missing or wrong.
        return 'Bearer realm="api"'
