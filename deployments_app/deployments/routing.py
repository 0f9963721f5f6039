"""The web side of a deployment: put a chat request on its stream, read the answer back."""

import logging
import time

import redis

from ..models import Deployment
from . import streams

log = logging.getLogger(__name__)
# After the first piece, an instance silent for this long is taken for dead.
_IDLE_TIMEOUT_SECONDS = 120
# What the caller is told while Redis, which carries requests to the instances, is away.
_REDIS_AWAY = "The deployment cannot be reached right now (its message broker is restarting); send it again shortly."


async def deployment_events(deployment: Deployment, params: dict):
    """Yield the answer's text pieces then its Completion; raise RemoteError if no instance answers."""
    client = streams.async_client()
    request_id = streams.new_request_id()
    reply = streams.reply_key(request_id)
    deadline = time.time() + streams.QUEUE_TIMEOUT_SECONDS
    finished = False
    try:
        pipe = client.pipeline(transaction=False)
        request = streams.encode_request(request_id, params, deadline=deadline)
        streams.add_request_commands(pipe, deployment.stream_key, request)
        await pipe.execute()
        last_id, last_seen, started = "0-0", time.monotonic(), False
        while True:
            batch = await client.xread({reply: last_id}, count=256, block=1000)
            if not batch:
                if not started and time.time() > deadline:
                    raise streams.RemoteError(
                        f"No instance of deployment {deployment.public_id} took the request within "
                        f"{streams.QUEUE_TIMEOUT_SECONDS} s.",
                        503,
                    )
                if started and time.monotonic() - last_seen > _IDLE_TIMEOUT_SECONDS:
                    raise streams.RemoteError("The instance stopped answering.", 504)
                continue
            for _key, entries in batch:
                for entry_id, fields in entries:
                    last_id, last_seen, started = entry_id, time.monotonic(), True
                    try:
                        event = streams.decode_reply(fields)
                    except streams.RemoteError:
                        finished = True  # the instance has stopped on its own
                        raise
                    if isinstance(event, streams.Completion):
                        finished = True
                    yield event
                    if finished:
                        return
    except redis.RedisError as exc:
        # Redis went away (a restart): the caller hears it now, in the error shape, and the next
        # request, once Redis is back, opens a new connection.
        log.warning("deployment %s: Redis failed during a request: %s", deployment.public_id, exc)
        raise streams.RemoteError(_REDIS_AWAY, 503, retry_after=5) from exc
    finally:
        await _clean_up(client, request_id, reply, finished=finished)


async def _clean_up(client, request_id: str, reply: str, *, finished: bool) -> None:
    try:
        if not finished:  # the caller left (or timed out): tell the instance to stop generating for nobody
            await client.set(streams.cancel_key(request_id), 1, ex=streams.REPLY_TTL_SECONDS)
        await client.delete(reply)
    except redis.RedisError:  # Redis is away: the reply stream expires on its own
        pass
    finally:
        await client.aclose()
