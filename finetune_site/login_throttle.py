"""Sign-in throttling for the console and /admin/: failed passwords are counted, then refused for a while.

Failures are counted in Redis per account and address, and per address over all
accounts (password spraying), for FT_LOGIN_LOCKOUT_SECONDS after the last one. Past
FT_LOGIN_MAX_FAILURES for an account from an address (or ten times that from an
address), the sign-in form refuses before it checks the password, saying for how long;
a successful sign-in clears the account's count. Without Redis nothing is counted.
"""

import logging

import redis
from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from .limits import redis_client

log = logging.getLogger(__name__)
_ADDRESS_FACTOR = 10
"""An address may fail this many times the per-account limit, over all accounts, before it is refused."""


def _address(request) -> str:
    return (request.META.get("REMOTE_ADDR") or "unknown") if request is not None else "unknown"


def _keys(request, username: str) -> tuple[str, str]:
    address = _address(request)
    return f"ft:login:{username.strip().lower()}:{address}", f"ft:login-address:{address}"


def locked_for(request, username: str) -> int:
    """Seconds this account may not sign in from this address; 0 when it may."""
    limit = settings.FT_LOGIN_MAX_FAILURES
    if not limit:
        return 0
    account, address = _keys(request, username)
    try:
        client = redis_client()
        counts = client.mget(account, address)
        if int(counts[0] or 0) >= limit:
            return max(1, client.ttl(account))
        if int(counts[1] or 0) >= limit * _ADDRESS_FACTOR:
            return max(1, client.ttl(address))
    except (redis.RedisError, OSError) as error:
        log.warning("sign-in failures are not counted: Redis is unreachable (%s)", error)
    return 0


def record_failure(sender, credentials, request=None, **kwargs) -> None:
    """user_login_failed: count one failure for the account and the address."""
    if not settings.FT_LOGIN_MAX_FAILURES:
        return
    seconds = settings.FT_LOGIN_LOCKOUT_SECONDS
    pipeline = redis_client().pipeline()
    for key in _keys(request, str(credentials.get("username", ""))):
        pipeline.incr(key).expire(key, seconds)
    try:
        pipeline.execute()
    except (redis.RedisError, OSError) as error:
        log.warning("a failed sign-in was not counted: Redis is unreachable (%s)", error)


def clear_failures(sender, request, user, **kwargs) -> None:
    """user_logged_in: the account's count starts again (the address keeps its own)."""
    try:
        redis_client().delete(_keys(request, user.get_username())[0])
    except (redis.RedisError, OSError):
        pass


class _Throttled:
    """Refuse a locked account before authenticate() is asked: no password is tried while locked."""

    request: object
    data: dict

    def clean(self):
        username = self.data.get("username") or ""
        seconds = locked_for(self.request, username)
        if seconds:
            minutes = -(-seconds // 60)
            raise forms.ValidationError(
                f"Too many failed sign-ins for {username} from your address: try again in "
                f"{minutes} minute{'s' if minutes != 1 else ''}.",
                code="locked",
            )
        return super().clean()  # type: ignore[misc]


class ThrottledAuthenticationForm(_Throttled, AuthenticationForm):
    """The console's sign-in form."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": "Your username and password did not match. Please try again.",
    }


class ThrottledAdminAuthenticationForm(_Throttled, AdminAuthenticationForm):
    """/admin/'s sign-in form."""
