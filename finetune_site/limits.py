"""Fair use: per-user limits on API requests and chat tokens per minute and on concurrent chat streams.

Counted in Redis, so every web process sees the same counts: a fixed one-minute
window per user (`INCRBY` and `EXPIRE` on a key named after the minute), and a
counter of open chat streams. A refusal is `Busy` (429 with `Retry-After`, in
the API's error shape), naming the limit and when to try again. When Redis
cannot be reached the limits let requests through: a missing counter must not
take the API down with it.

    FT_RATE_LIMIT_RPM            API requests per user per minute (0: no limit)
    FT_RATE_LIMIT_TPM            chat tokens (prompt + answer) per user per minute (0: no limit)
    FT_MAX_CHAT_STREAMS_PER_USER chat requests one user may have open at once (0: no limit)

What a user keeps rather than sends (storage, deployment slots) is limited in `finetune_site.quotas`.
"""

import logging
import time

import redis
from django.conf import settings
from rest_framework.throttling import BaseThrottle

from .errors import Busy

log = logging.getLogger(__name__)
_WINDOW = 60
_STREAM_KEY_SECONDS = 3600
"""An open-stream count expires after this, so a process killed mid-stream never blocks its user for good."""
_clients: dict[str, redis.Redis] = {}


def redis_client() -> redis.Redis:
    """This process's client for the counters: quick to give up, so a missing Redis costs little."""
    client = _clients.get(settings.REDIS_URL)
    if client is None:
        client = _clients[settings.REDIS_URL] = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5
        )
    return client


def _window() -> tuple[int, float]:
    """(this minute's number, seconds until the next minute)."""
    now = time.time()
    return int(now // _WINDOW), _WINDOW - now % _WINDOW


def _count(kind: str, user_id: int, amount: int) -> tuple[int, float] | None:
    """Add amount to this minute's count of kind for the user; (the new count, seconds left), None without Redis."""
    minute, left = _window()
    key = f"ft:rate:{kind}:{user_id}:{minute}"
    try:
        count, _ = redis_client().pipeline().incrby(key, amount).expire(key, _WINDOW + 5).execute()
    except (redis.RedisError, OSError) as error:
        log.warning("rate limits are not counted: Redis is unreachable (%s)", error)
        return None
    return int(count), left


def take_request(user) -> None:
    """Count one API request of the user; refuse it past FT_RATE_LIMIT_RPM this minute."""
    limit = settings.FT_RATE_LIMIT_RPM
    if not limit or not getattr(user, "is_authenticated", False):
        return
    counted = _count("requests", user.pk, 1)
    if counted is not None and counted[0] > limit:
        raise Busy(
            f"Rate limit reached: {limit} requests per minute for your account. Retry in {counted[1]:.0f} s.",
            retry_after=counted[1],
            code="rate_limit_exceeded",
        )


def check_tokens(user) -> None:
    """Refuse a chat request while the user's chat tokens this minute are past FT_RATE_LIMIT_TPM."""
    limit = settings.FT_RATE_LIMIT_TPM
    if not limit:
        return
    counted = _count("tokens", user.pk, 0)
    if counted is not None and counted[0] >= limit:
        raise Busy(
            f"Token rate limit reached: {limit} tokens per minute for your account. Retry in {counted[1]:.0f} s.",
            retry_after=counted[1],
            code="rate_limit_exceeded",
        )


def add_tokens(user, tokens: int) -> None:
    """Count the tokens (prompt and answer) of a finished chat request."""
    if settings.FT_RATE_LIMIT_TPM and tokens > 0:
        _count("tokens", user.pk, tokens)


def _open_stream(user_id: int, streams: int = 1) -> bool:
    limit = settings.FT_MAX_CHAT_STREAMS_PER_USER
    if not limit:
        return True
    key = f"ft:streams:{user_id}"
    try:
        count, _ = redis_client().pipeline().incrby(key, streams).expire(key, _STREAM_KEY_SECONDS).execute()
        if count > limit:
            redis_client().decrby(key, streams)
            return False
    except (redis.RedisError, OSError) as error:
        log.warning("chat streams are not counted: Redis is unreachable (%s)", error)
    return True


def _close_stream(user_id: int, streams: int = 1) -> None:
    if not settings.FT_MAX_CHAT_STREAMS_PER_USER:
        return
    try:
        redis_client().decrby(f"ft:streams:{user_id}", streams)
    except (redis.RedisError, OSError):
        pass  # the key expires on its own


def admit_chat(user, streams: int = 1) -> None:
    """Count a chat request and take `streams` of the user's open-stream slots (one per choice of `n`).

    finish_chat gives them back. Raises Busy past the requests or tokens per minute, or when
    FT_MAX_CHAT_STREAMS_PER_USER would be passed.
    """
    take_request(user)
    check_tokens(user)
    if not _open_stream(user.pk, streams):
        limit = settings.FT_MAX_CHAT_STREAMS_PER_USER
        raise Busy(
            f"Too many chat requests at once: your account may have {limit} open. Retry when one has finished.",
            retry_after=1,
            code="too_many_concurrent_requests",
        )


def finish_chat(user, tokens: int, streams: int = 1) -> None:
    """A chat request admitted by admit_chat (with as many streams) ended, having used tokens (prompt and answer)."""
    add_tokens(user, tokens)
    _close_stream(user.pk, streams)


class RequestRate(BaseThrottle):
    """DRF's side of take_request: every API view counts against the caller's requests per minute."""

    def allow_request(self, request, view) -> bool:
        take_request(request.user)  # raises Busy, answered 429 with Retry-After by the API's error handler
        return True
