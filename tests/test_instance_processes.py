"""Deployment instances as OS processes: load at heartbeats, a SIGKILLed one replaced, cancel ending the process.

The first tests use a real Redis on 127.0.0.1:6379 (skipped without one); the
live ones start the whole stack and kill real instance processes.
"""

import os
import signal
import threading
import time

import httpx
import pytest
from django.contrib.auth import get_user_model

from deployments_app.deployments import streams
from deployments_app.deployments.instance import _Server, load_fields
from deployments_app.models import Deployment, Instance
from llm.bundled import TINY_MODEL_ID
from llm.serve.errors import Overloaded
from llm.serve.openmp import INTEL_OPENMP, serving_environment
from llm.serve.pool import ModelPool

from .live import chat_events, local_redis, login_cookies
from .test_deployments_live import wait_for


@pytest.fixture
def redis_client(settings):
    with local_redis(settings, 11) as client:
        yield client


def take(client, stream_key: str, consumer: str, count: int) -> list:
    streams.ensure_group(client, stream_key)
    batch = client.xreadgroup(streams.GROUP, consumer, {stream_key: ">"}, count=count)
    return [(msg_id, fields) for _key, messages in batch for msg_id, fields in messages]


def test_a_dead_consumers_begun_answers_end_with_an_error_and_the_rest_wait_for_another(redis_client):
    key = "ft:deployment:dep-test:requests"
    redis_client.xadd(key, streams.encode_request("begun", {}, deadline=time.time() + 60))
    redis_client.xadd(key, streams.encode_request("waiting", {}, deadline=time.time() + 60))
    taken = take(redis_client, key, "inst-dead", 2)
    assert len(taken) == 2
    streams.send_event(redis_client, streams.reply_key("begun"), streams.piece_event("Hel"))

    assert streams.fail_begun_requests(redis_client, key, "inst-dead", "gone") == 1

    entries = redis_client.xrange(streams.reply_key("begun"))
    assert streams.decode_reply(entries[0][1]) == "Hel"
    with pytest.raises(streams.RemoteError) as error:
        streams.decode_reply(entries[-1][1])
    assert error.value.status == 503 and str(error.value) == "gone"
    pending = redis_client.xpending_range(key, streams.GROUP, "-", "+", 10, consumername="inst-dead")
    assert [p["message_id"] for p in pending] == [taken[1][0]]  # left for _reclaim
    assert not redis_client.exists(streams.reply_key("waiting"))


def test_a_consumer_that_took_nothing_has_nothing_to_end(redis_client):
    assert streams.fail_begun_requests(redis_client, "ft:deployment:none:requests", "inst-x", "gone") == 0


def test_an_error_event_carries_retry_after():
    with pytest.raises(streams.RemoteError) as error:
        streams.decode_reply(streams.error_event("full", status=429, retry_after=2.5))
    assert (error.value.status, error.value.retry_after) == (429, 2.5)
    with pytest.raises(streams.RemoteError) as error:
        streams.decode_reply(streams.error_event("broken", status=500))
    assert error.value.retry_after is None


@pytest.fixture
def serving_instance(db, tiny_model_dir, settings):
    from deployments_app.catalog import resolve_model

    settings.FT_MODELS_DIR = tiny_model_dir.parent
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    deployment = Deployment.objects.create(owner=alice, model_id=TINY_MODEL_ID)
    instance = Instance.objects.create(deployment=deployment)
    assert instance.claim_running("test-worker")
    return instance, deployment, resolve_model(alice, TINY_MODEL_ID)


def test_heartbeats_carry_the_engine_load(serving_instance, monkeypatch, client):
    from rest_framework.test import APIClient

    instance, deployment, resolved = serving_instance
    load = {
        "queue_depth": 3,
        "running": 2,
        "tokens_per_second": 41.5,
        "first_token_p50_ms": 120.0,
        "first_token_p95_ms": 310.0,
    }
    monkeypatch.setattr(ModelPool, "load_stats", lambda self: load)
    server = _Server(instance, deployment, ModelPool(device="cpu"), resolved, host_gone=lambda: False)

    assert server._heartbeat() == Instance.RUNNING

    instance.refresh_from_db()
    assert (instance.queue_depth, instance.running_requests, instance.recent_tokens_per_second) == (3, 2, 41.5)
    assert (instance.first_token_p50_ms, instance.first_token_p95_ms) == (120.0, 310.0)
    api = APIClient()
    api.force_authenticate(deployment.owner)
    listed = api.get(f"/api/deployments/{deployment.public_id}").json()["instance_list"][0]
    assert {k: listed[k] for k in load_fields(load)} == load_fields(load)
    client.force_login(deployment.owner)
    page = client.get(f"/deployments/{deployment.public_id}/", HTTP_HX_REQUEST="true")
    assert page.status_code == 200 and b'data-testid="queue-depth">3<' in page.content
    # A stopped instance carries no load.
    instance.mark_final(Instance.STOPPED)
    instance.refresh_from_db()
    assert (instance.queue_depth, instance.running_requests, instance.recent_tokens_per_second) == (0, 0, 0.0)


def test_an_overloaded_engine_is_answered_429_with_retry_after(serving_instance, redis_client, monkeypatch):
    instance, deployment, resolved = serving_instance

    def overloaded(self, request):
        raise Overloaded("The model is busy.", retry_after=3.0)

    monkeypatch.setattr(ModelPool, "generate_stream", overloaded)
    server = _Server(instance, deployment, ModelPool(device="cpu"), resolved, host_gone=lambda: False)
    params = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    redis_client.xadd(deployment.stream_key, streams.encode_request("r1", params, deadline=time.time() + 60))
    [(msg_id, fields)] = take(redis_client, deployment.stream_key, instance.public_id, 1)

    server._answer(msg_id, fields)

    [(_id, reply)] = redis_client.xrange(streams.reply_key("r1"))
    with pytest.raises(streams.RemoteError) as error:
        streams.decode_reply(reply)
    assert (error.value.status, error.value.retry_after, str(error.value)) == (429, 3.0, "The model is busy.")


# --- Live: real instance processes under the serving worker.

LONG = 3500
"""Tokens a stream asks for: the tiny model needs several seconds for them, time enough to kill its instance."""


@pytest.fixture(scope="module")
def rest(stack):
    key = stack.api_key("erin")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        yield http


def running(body):
    return [i for i in body["instance_list"] if i["status"] == "running"]


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Stream(threading.Thread):
    """One streamed chat request, read as server-sent events; records pieces, finish_reason, error, end time."""

    def __init__(self, rest, *, max_tokens=LONG):
        super().__init__(daemon=True)
        self.rest, self.max_tokens = rest, max_tokens
        self.pieces, self.finish_reason, self.error, self.ended_at = 0, None, None, None

    def run(self):
        body = {
            "model": TINY_MODEL_ID,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        try:
            with self.rest.stream("POST", "/v1/chat/completions", json=body, timeout=300) as response:
                assert response.status_code == 200, response.read()
                for event in chat_events(response):
                    if "error" in event:
                        self.error = event["error"]
                        continue
                    for choice in event.get("choices", []):
                        if choice["delta"].get("content"):
                            self.pieces += 1
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except Exception as exc:  # noqa: BLE001 - asserted on
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()

    def wait_for_pieces(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.pieces < count:
            assert self.ended_at is None, f"the stream ended early: {self.error or self.finish_reason}"
            assert time.monotonic() < deadline, "the stream never began"
            time.sleep(0.05)


@pytest.mark.live
@pytest.mark.timeout(600)
def test_a_sigkilled_instance_is_replaced_and_only_its_stream_ends_with_an_error(stack, rest):
    created = rest.post("/api/deployments", json={"model": TINY_MODEL_ID, "instances": 2, "max_concurrent_requests": 1})
    assert created.status_code == 200, created.text
    dep = created.json()["id"]
    body = wait_for(rest, dep, lambda b: len(running(b)) == 2, what="two instances running")
    pids = [i["pid"] for i in running(body)]
    worker_pid = int(stack.supervisorctl("pid", "worker-serve").strip())
    assert len(set(pids)) == 2 and worker_pid not in pids and all(process_exists(p) for p in pids)
    if serving_environment(os.environ):  # Intel's OpenMP is installed: the instances run torch with it
        assert all(INTEL_OPENMP in open(f"/proc/{p}/maps").read() for p in pids)
    for field in ("queue_depth", "running_requests", "recent_tokens_per_second", "first_token_p95_ms"):
        assert field in body["instance_list"][0]

    # One instance takes one request at a time: two streams at once run on the two processes.
    first, second = Stream(rest), Stream(rest)
    first.start()
    second.start()
    first.wait_for_pieces(5)
    second.wait_for_pieces(5)
    victim, survivor = running(body)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    first.join(timeout=150)
    second.join(timeout=150)

    outcomes = sorted([(s.error is None, s) for s in (first, second)], key=lambda pair: pair[0])
    failed, finished = outcomes[0][1], outcomes[1][1]
    assert failed.error is not None and "stopped mid-answer" in str(failed.error), failed.error
    assert failed.ended_at - killed_at < 15, "the killed instance's stream hung instead of ending with an error"
    assert finished.error is None and finished.finish_reason == "length", (finished.error, finished.finish_reason)

    body = wait_for(
        rest,
        dep,
        lambda b: len(running(b)) == 2 and victim["id"] not in {i["id"] for i in running(b)},
        what="a replacement running",
        timeout=120,
    )
    states = {i["id"]: i for i in body["instance_list"]}
    assert states[victim["id"]]["status"] == "dead" and "SIGKILL" in states[victim["id"]]["detail"]
    assert states[survivor["id"]]["status"] == "running" and states[survivor["id"]]["pid"] == survivor["pid"]
    assert not process_exists(victim["pid"])

    # Staff see both running instances on /metrics.
    metrics = httpx.get(stack.url + "/metrics", cookies=login_cookies(stack), timeout=30)
    assert metrics.status_code == 200
    for instance in running(body):
        assert f'ft_instance_up{{deployment="{dep}",instance="{instance["id"]}"}} 1' in metrics.text
    rest.delete(f"/api/deployments/{dep}")


@pytest.mark.live
@pytest.mark.timeout(600)
def test_cancelling_a_deployment_ends_its_process_and_its_running_streams(stack, rest):
    dep = rest.post("/api/deployments", json={"model": TINY_MODEL_ID, "instances": 1}).json()["id"]
    body = wait_for(rest, dep, lambda b: len(running(b)) == 1, what="running")
    pid = running(body)[0]["pid"]
    stream = Stream(rest)
    stream.start()
    stream.wait_for_pieces(5)

    cancelled = rest.delete(f"/api/deployments/{dep}")
    cancelled_at = time.monotonic()
    assert cancelled.json()["status"] == "cancelled"
    stream.join(timeout=60)

    assert stream.error is None and stream.finish_reason == "cancelled", (stream.error, stream.finish_reason)
    assert stream.ended_at - cancelled_at < 15
    wait_for(rest, dep, lambda b: [i["status"] for i in b["instance_list"]] == ["stopped"], what="stopped")
    deadline = time.monotonic() + 30
    while process_exists(pid):
        assert time.monotonic() < deadline, "the instance's process outlived its cancelled deployment"
        time.sleep(0.2)


@pytest.fixture
def started(monkeypatch):
    """Instance ids handed to the serving queue."""
    sent = []
    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: sent.append(pk))
    return sent


def test_a_process_killed_while_serving_is_marked_dead_and_replaced_at_once(
    serving_instance, redis_client, started, django_capture_on_commit_callbacks
):
    from deployments_app.deployments import services

    instance, deployment, _ = serving_instance
    with django_capture_on_commit_callbacks(execute=True):
        services.instance_process_ended(instance_id=instance.pk, exit_status=-signal.SIGKILL)

    instance.refresh_from_db()
    assert instance.status == Instance.DEAD and instance.detail == "The instance process was killed by SIGKILL."
    replacement = deployment.instance_set.exclude(pk=instance.pk).get()
    assert replacement.status == Instance.STARTING and started == [replacement.pk]


def test_a_process_that_dies_while_loading_fails_the_deployment_instead_of_looping(
    serving_instance, started, django_capture_on_commit_callbacks
):
    from deployments_app.deployments import services

    _, deployment, _ = serving_instance
    loading = Instance.objects.create(deployment=deployment)
    with django_capture_on_commit_callbacks(execute=True):
        services.instance_process_ended(instance_id=loading.pk, exit_status=-signal.SIGKILL)

    deployment.refresh_from_db()
    assert deployment.status == Deployment.FAILED
    assert deployment.error == "The instance process was killed by SIGKILL while it loaded the model."
    assert started == []
    assert sorted(deployment.instance_set.values_list("status", flat=True)) == ["dead", "stopping"]
