"""Serving's Redis streams stay bounded, and the web side never hangs when Redis is away.

Uses a real Redis on 127.0.0.1:6379 (skipped without one) and, for the outage, a port nothing listens on.
"""

import asyncio
import time

import pytest

from deployments_app.deployments import streams
from deployments_app.deployments.routing import deployment_events
from deployments_app.models import Deployment

from .live import free_port, local_redis


@pytest.fixture
def redis_client(settings):
    with local_redis(settings, 10) as client:
        yield client


def test_a_reply_nobody_reads_is_capped_and_expires(redis_client, monkeypatch):
    monkeypatch.setattr(streams, "REPLY_STREAM_MAXLEN", 100, raising=False)
    reply = streams.reply_key("unread")
    for n in range(2000):
        streams.send_event(redis_client, reply, streams.piece_event(str(n)))

    # Trimming is approximate (whole nodes of 100 entries): about the cap, never the 2000 sent.
    assert 100 <= redis_client.xlen(reply) < 300
    assert 0 < redis_client.ttl(reply) <= streams.REPLY_TTL_SECONDS


def test_requests_nobody_takes_are_capped_in_number_and_expire(redis_client, monkeypatch):
    monkeypatch.setattr(streams, "REQUEST_STREAM_MAXLEN", 100)
    key = "ft:deployment:dep-abandoned:requests"
    for n in range(1000):  # many requests, which nobody takes
        pipe = redis_client.pipeline(transaction=False)
        streams.add_request_commands(pipe, key, streams.encode_request(f"n{n}", {}, deadline=0))
        pipe.execute()

    # Trimming is approximate (whole nodes of 100 entries): about the cap, never the 1000 sent.
    ids = [streams.decode_request(fields)[0] for _id, fields in redis_client.xrange(key)]
    assert ids[-1] == "n999" and 100 <= len(ids) < 300
    assert 0 < redis_client.ttl(key) <= streams.REQUEST_STREAM_TTL_SECONDS


def test_a_request_taken_long_ago_stays_while_its_instance_answers_it(redis_client):
    """A long answer outlives the stream's TTL: its entry must stay for `fail_begun_requests` to find."""
    key = "ft:deployment:dep-long-answer:requests"
    streams.ensure_group(redis_client, key)
    long_ago = int((time.time() - 3 * streams.REQUEST_STREAM_TTL_SECONDS) * 1000)
    redis_client.xadd(key, streams.encode_request("long", {}, deadline=0), id=f"{long_ago}-0")
    redis_client.xreadgroup(streams.GROUP, "inst-1", {key: ">"}, count=1)  # taken, being answered
    redis_client.expire(key, 1)  # nearly expired: no request came for a while

    streams.ensure_group(redis_client, key)  # the instance's heartbeat
    pipe = redis_client.pipeline(transaction=False)
    streams.add_request_commands(pipe, key, streams.encode_request("next", {}, deadline=0))
    pipe.execute()

    assert [streams.decode_request(fields)[0] for _id, fields in redis_client.xrange(key)] == ["long", "next"]
    assert redis_client.ttl(key) > streams.REQUEST_STREAM_TTL_SECONDS - 5
    redis_client.xadd(streams.reply_key("long"), streams.piece_event("x"))  # begun when the instance died
    assert streams.fail_begun_requests(redis_client, key, "inst-1", "the instance died") == 1


def test_an_expired_request_stream_is_made_again_with_its_group(redis_client):
    key = "ft:deployment:dep-expired:requests"
    streams.ensure_group(redis_client, key)
    redis_client.delete(key)  # what its expiry, or a Redis restart without persistence, does
    with pytest.raises(Exception) as error:
        redis_client.xreadgroup(streams.GROUP, "inst-1", {key: ">"}, count=1)
    assert streams.is_transient(error.value)  # the instance waits and makes it again, it does not die

    streams.ensure_group(redis_client, key)
    redis_client.xadd(key, streams.encode_request("after", {}, deadline=0))
    batch = redis_client.xreadgroup(streams.GROUP, "inst-1", {key: ">"}, count=1)
    assert streams.decode_request(batch[0][1][0][1])[0] == "after"


def test_a_chat_sent_while_redis_is_away_is_refused_within_seconds(settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    deployment = Deployment(model_id="tiny")

    async def first_event():
        return await anext(deployment_events(deployment, {"messages": []}))

    started = time.monotonic()
    with pytest.raises(streams.RemoteError) as error:
        asyncio.run(first_event())
    assert error.value.status == 503 and "send it again" in str(error.value)
    assert time.monotonic() - started < 5
