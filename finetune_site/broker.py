"""What the Celery broker (Redis) still holds, so that a sweep can tell a task whose message was lost
(Redis restarted without it, a worker died after taking it) from one still waiting its turn."""

import base64
import json
import time

from .celery import app


def queue_of(task_name: str) -> str:
    """The queue CELERY_TASK_ROUTES sends the task to."""
    route = app.amqp.router.route({}, task_name)
    return route["queue"].name


def waiting_task_args(task_name: str, *, reserved_within: float | None = None) -> list[list]:
    """The positional arguments of every message of `task_name` not yet started.

    That is, still waiting in its queue, or reserved by a worker (prefetched) and not yet begun:
    kombu keeps those in its `unacked` hash until the task starts and acknowledges it. A worker
    killed holding one leaves it there until kombu's visibility timeout (an hour): with
    reserved_within, a message reserved longer ago than that many seconds counts as lost.
    Messages of running tasks are not counted: a caller that sends such a task again must make
    its second run harmless.
    """
    queue = queue_of(task_name)
    found = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        client = channel.client
        # kombu keeps one Redis list per priority step for a queue.
        keys = {channel._q_for_pri(queue, step) for step in channel.priority_steps}
        messages = [raw for key in keys for raw in client.lrange(key, 0, -1)]
        since = float("-inf") if reserved_within is None else time.time() - reserved_within
        reserved = client.zrange(channel.unacked_index_key, 0, -1, withscores=True)  # (tag, when)
        tags = [tag for tag, at in reserved if at >= since]
        for raw in client.hmget(channel.unacked_key, tags) if tags else []:
            try:  # [message, exchange, routing key]
                messages.append(json.loads(raw)[0])
            except (ValueError, IndexError, TypeError):  # gone meanwhile, or of another shape
                continue
        for message in messages:
            args = _task_args(message, task_name)
            if args is not None:
                found.append(args)
    return found


def _task_args(raw: bytes | dict, task_name: str) -> list | None:
    try:
        message = raw if isinstance(raw, dict) else json.loads(raw)
        if message.get("headers", {}).get("task") != task_name:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        return list(args)
    except (ValueError, KeyError, TypeError):  # a message of another shape: not ours to count
        return None


def send_task(task, *args) -> None:
    """Send `task(*args)` through a connection made now from the broker settings."""
    with app.connection_for_write() as connection:
        task.apply_async(args, connection=connection)
