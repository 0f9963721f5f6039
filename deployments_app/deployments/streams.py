"""The Redis protocol between the web's chat view and deployment instances.

Requests go to one stream per deployment, read by a consumer group whose
consumers are the deployment's instances, so each request reaches exactly one
instance. Each answer comes back on its own short-lived reply stream, one entry
per text piece, then a `done` entry with the completion (or an `error` entry).
"""

import json
import uuid
from dataclasses import asdict

from django.conf import settings

from llm.serve.schema import Completion, TextPiece, piece_logprobs

GROUP = "instances"
REPLY_TTL_SECONDS = 300
# A request nobody has started within this long is answered with an error and skipped.
QUEUE_TIMEOUT_SECONDS = 120
# Caps, so that requests nobody takes and answers nobody reads never pile up in Redis.
# A request stream keeps at most about this many entries (an answered one is deleted, and an
# instance answers one whose caller gave up with an error at once), and vanishes this long after
# its last request or its last instance's heartbeat (`ensure_group` keeps it while one serves).
# Entries are never dropped by age: one taken long ago may still be being answered, and a dead
# instance's begun answers are found by their entries (`fail_begun_requests`).
REQUEST_STREAM_MAXLEN = 10_000
REQUEST_STREAM_TTL_SECONDS = 2 * QUEUE_TIMEOUT_SECONDS
# A reply stream holds one answer, one entry per piece: room for the longest answer
# (max_tokens is at most 32768, about one piece per token) and its ending.
REPLY_STREAM_MAXLEN = 33_000
# What the caller of an answer is told when the instance answering it died mid-answer.
STOPPED_MID_ANSWER = "The instance answering this request stopped mid-answer; send it again."


def reply_key(request_id: str) -> str:
    return f"ft:reply:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set by the web side when the caller left before the answer ended: the instance stops generating."""
    return f"ft:cancel:{request_id}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def encode_request(request_id: str, params: dict, *, deadline: float) -> dict:
    return {"id": request_id, "params": json.dumps(params), "deadline": str(deadline)}


def decode_request(fields: dict) -> tuple[str, dict, float]:
    fields = {as_text(k): as_text(v) for k, v in fields.items()}
    return fields["id"], json.loads(fields["params"]), float(fields.get("deadline") or 0)


def piece_event(text: str) -> dict:
    """A piece of text; the logprobs of its tokens travel with it when it has them (a TextPiece)."""
    logprobs = piece_logprobs(text)
    if logprobs:
        return {"type": "piece", "data": str(text), "logprobs": json.dumps(logprobs)}
    return {"type": "piece", "data": str(text)}


def done_event(completion: Completion) -> dict:
    return {"type": "done", "data": json.dumps(asdict(completion))}


def error_event(message: str, *, status: int, retry_after: float | None = None, param: str | None = None) -> dict:
    """retry_after: seconds the caller should wait before sending it again (with a 429); param: the
    request field at fault (with a 400)."""
    error = {"message": message, "status": status}
    if retry_after is not None:
        error["retry_after"] = retry_after
    if param is not None:
        error["param"] = param
    return {"type": "error", "data": json.dumps(error)}


class RemoteError(Exception):
    """The instance could not answer; status is the HTTP status to report, retry_after the seconds to wait,
    param the request field at fault."""

    def __init__(self, message: str, status: int = 500, retry_after: float | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.param = param


def decode_reply(fields: dict):
    """A text piece (str) or a Completion; raises RemoteError for an error entry."""
    fields = {as_text(k): as_text(v) for k, v in fields.items()}
    kind, data = fields.get("type"), fields.get("data", "")
    if kind == "piece":
        logprobs = fields.get("logprobs")
        return TextPiece(data, json.loads(logprobs)) if logprobs else data
    if kind == "done":
        return Completion(**json.loads(data))
    error = json.loads(data) if data else {}
    raise RemoteError(
        error.get("message", "the instance failed"),
        error.get("status", 500),
        error.get("retry_after"),
        error.get("param"),
    )


def send_event(client, reply: str, event: dict) -> None:
    """Append one event to a reply stream, which is capped and expires if nobody reads it."""
    pipe = client.pipeline(transaction=False)
    pipe.xadd(reply, event, maxlen=REPLY_STREAM_MAXLEN, approximate=True)
    pipe.expire(reply, REPLY_TTL_SECONDS)
    pipe.execute()


def add_request_commands(pipe, stream_key: str, request: dict) -> None:
    """Queue on `pipe` the commands that put a request on a deployment's stream, capped in length, expiring."""
    pipe.xadd(stream_key, request, maxlen=REQUEST_STREAM_MAXLEN, approximate=True)
    pipe.expire(stream_key, REQUEST_STREAM_TTL_SECONDS)


def is_transient(exc: Exception) -> bool:
    """Whether a Redis error is Redis being away (restarting, loading, a stream lost with it): retry, not fail."""
    import redis

    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # BusyLoadingError (LOADING) is one
        return True
    # After a restart without persistence, or once a request stream has expired, the stream and
    # its group are gone; a reader blocked on a deleted stream is told UNBLOCKED (Redis 7).
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and any(
        word in text for word in ("NOGROUP", "UNBLOCKED", "no such key", "LOADING")
    )


def fail_begun_requests(client, stream_key: str, consumer: str, message: str) -> int:
    """End with a 503 error event every answer a dead consumer had begun; return how many.

    A request is begun when its reply stream exists. Those are acknowledged and
    deleted, so nobody answers them again; requests the consumer took but had
    not begun stay pending, for a live instance to take over (`XCLAIM`).
    """
    import redis

    try:
        pending = client.xpending_range(stream_key, GROUP, min="-", max="+", count=10_000, consumername=consumer)
    except redis.ResponseError:  # no such stream or group: nothing was taken
        return 0
    ended = 0
    for entry in pending:
        msg_id = entry["message_id"]
        fields = client.xrange(stream_key, min=msg_id, max=msg_id)
        if not fields:
            client.xack(stream_key, GROUP, msg_id)
            continue
        request_id, _params, _deadline = decode_request(fields[0][1])
        reply = reply_key(request_id)
        if client.exists(reply):
            send_event(client, reply, error_event(message, status=503))
            client.xack(stream_key, GROUP, msg_id)
            client.xdel(stream_key, msg_id)
            ended += 1
    return ended


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def sync_client(*, socket_timeout: float = 30, connect_timeout: float = 5):
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    # Few quick retries: an instance must get back to its (database) heartbeat soon while Redis
    # is away, and then retries at its own pace (`instance._Server`).
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
    )


def async_client():
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    # A few quick retries (about a second in all), not redis-py's ten: while Redis is away the
    # caller gets an error within seconds instead of a request that hangs.
    return redis.asyncio.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=30,
        socket_connect_timeout=2,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
    )


def ensure_group(client, stream_key: str) -> None:
    """Make the request stream and its group if they are gone; either way it lives on for another TTL."""
    import redis

    try:
        client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    client.expire(stream_key, REQUEST_STREAM_TTL_SECONDS)
