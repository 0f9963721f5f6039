"""A Redis restart (kill -9, then the same server on the same socket, data folder and append-only file,
as supervisord starts it under `make run`) during a training job and during a deployment: both carry on,
and nothing is lost."""

import os
import signal
import time

import httpx
import pytest

from llm.bundled import TINY_MODEL_ID

from ..live import chat_events, job_step, kill_program, metric_steps, program_pid, wait_finished, wait_until

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(420)]


def test_a_training_job_carries_on_through_a_redis_restart(fault_stack, alice, alice_file):
    job = alice.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=alice_file.id,
        suffix="redis",
        hyperparameters={"n_epochs": 5, "batch_size": 1, "save_every": 10},
    )
    total = 5 * 40
    wait_until(lambda: job_step(alice, job.id) >= 3, timeout=120, what="the job to train")
    assert job_step(alice, job.id) < total - 20, "the job is nearly done before the restart; it must run longer"

    kill_program(fault_stack, "redis")

    done = wait_finished(alice, job.id, timeout=300)
    assert done.status == "succeeded", done.error
    steps = metric_steps(alice, job.id)
    assert sorted(steps) == list(range(1, total + 1)), f"each of the {total} steps once, got {sorted(steps)}"


def chat(http: httpx.Client, *, max_tokens: int = 8) -> tuple[int, str | None, str | None]:
    """A streamed chat: (content pieces, finish_reason, error); raises nothing, whatever the server does."""
    pieces, finish, error = 0, None, None
    body = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    try:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
            if response.status_code != 200:
                return 0, None, f"{response.status_code}: {response.read()[:300]!r}"
            for event in chat_events(response):
                error = event.get("error", error)
                for choice in event.get("choices", []):
                    pieces += bool(choice["delta"].get("content"))
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        error = repr(exc)
    return pieces, finish, error


@pytest.fixture
def dave(fault_stack):
    key = fault_stack.api_key("dave")
    with httpx.Client(base_url=fault_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        yield http


def test_a_deployment_carries_on_through_a_redis_restart(fault_stack, dave):
    created = dave.post("/api/deployments", json={"model": TINY_MODEL_ID, "instances": 1})
    assert created.status_code == 200, created.text
    deployment = created.json()["id"]

    def instances():
        return dave.get(f"/api/deployments/{deployment}").json()["instance_list"]

    instance = wait_until(
        lambda: [i for i in instances() if i["status"] == "running"], timeout=120, what="the instance to run"
    )[0]
    assert chat(dave)[1] in ("stop", "length")

    # Redis dies and stays down: a chat meanwhile is refused within seconds, it does not hang.
    redis_pid = program_pid(fault_stack, "redis")
    os.kill(redis_pid, signal.SIGKILL)
    fault_stack.supervisorctl("stop", "redis")
    wait_until(lambda: program_pid(fault_stack, "redis") is None, timeout=30, what="Redis to be down")
    sent_at = time.monotonic()
    pieces, finish, error = chat(dave)
    assert error is not None and finish is None, (pieces, finish, error)
    assert time.monotonic() - sent_at < 15, f"a chat while Redis was down took {time.monotonic() - sent_at:.0f}s"
    time.sleep(5)  # longer than the instance's first retries

    fault_stack.supervisorctl("start", "redis")
    wait_until(lambda: program_pid(fault_stack, "redis"), timeout=30, what="Redis to start again")
    served = sum(i["requests_served"] for i in instances())
    # The first chat once Redis is back is answered, by the same instance: it waited for Redis, it did not die.
    pieces, finish, error = chat(dave)
    assert error is None and finish in ("stop", "length") and pieces >= 1, (pieces, finish, error)
    now = {i["id"]: i for i in instances()}
    assert now[instance["id"]]["status"] == "running", now
    assert [i for i in now.values() if i["status"] == "running"] == [now[instance["id"]]]
    wait_until(lambda: sum(i["requests_served"] for i in instances()) > served, timeout=30, what="the request counted")
    dave.delete(f"/api/deployments/{deployment}")
