"""Jobs against the live stack: cancel, pause/resume, crash recovery, live websocket points, zhipuai."""

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from llm.bundled import TINY_MODEL_ID

from .live import chat_lines, login_cookies

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def admin_key(stack):
    return stack.api_key("admin")


@pytest.fixture(scope="module")
def client(stack, admin_key):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=admin_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def long_file(client):
    uploaded = client.files.create(file=("long.jsonl", chat_lines(120)), purpose="fine-tune")
    return client.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)


def create_long_job(client, file_id, **hyperparameters):
    params = {"n_epochs": 4, "batch_size": 1, "save_every": 40, **hyperparameters}
    return client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=file_id, hyperparameters=params)


def wait_until(predicate, timeout=300, interval=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def job_step(client, job_id) -> int:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return (job.model_extra or {}).get("progress", {}).get("step", 0)


def all_metric_steps(client, job_id) -> list[int]:
    steps = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.type == "metrics" and event.data.get("train_loss") is not None:
            steps.append(event.data["step"])
    return steps


def finished(client, job_id):
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def test_cancel_stops_a_running_job_and_keeps_checkpoints(client, long_file):
    job = create_long_job(client, long_file.id, save_every=10)
    wait_until(lambda: job_step(client, job.id) >= 12, what="the first checkpoint")
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_until(lambda: finished(client, job.id), timeout=60, what="cancellation")
    assert done.status == "cancelled"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data, "finished checkpoints are kept"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_pause_saves_a_checkpoint_and_resume_finishes_without_repeated_steps(stack, client, long_file):
    job = create_long_job(client, long_file.id, n_epochs=2)
    wait_until(lambda: job_step(client, job.id) >= 5, what="training to start")
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j, timeout=60, what="pause"
    )
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    paused_step = (paused.model_extra or {})["progress"]["step"]
    assert checkpoints and checkpoints[0].step_number == paused_step
    client.fine_tuning.jobs.resume(job.id)
    done = wait_until(lambda: finished(client, job.id), what="the resumed job")
    assert done.status == "succeeded", done.error
    steps = all_metric_steps(client, job.id)
    assert len(steps) == len(set(steps)) and max(steps) == 240


def test_a_killed_training_worker_is_replaced_and_the_job_resumes(stack, client, long_file):
    job = create_long_job(client, long_file.id, n_epochs=3, save_every=20)
    wait_until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="a checkpoint")
    pid = int(stack.supervisorctl("pid", "worker-train").strip())
    os.kill(pid, signal.SIGKILL)
    done = wait_until(lambda: finished(client, job.id), timeout=400, what="recovery and completion")
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "message"]
    assert any("stopped responding" in m for m in messages), messages
    assert any("from the checkpoint at step" in m for m in messages if m.startswith("Training started")), messages
    steps = all_metric_steps(client, job.id)
    assert len(steps) == len(set(steps)) and max(steps) == 360
    assert int(stack.supervisorctl("pid", "worker-train").strip()) != pid


def test_a_websocket_client_receives_live_points(stack, client, long_file):
    import websockets
    import websockets.exceptions

    cookies = login_cookies(stack)
    job = create_long_job(client, long_file.id, n_epochs=1)

    async def watch():
        url = f"ws://127.0.0.1:{stack.port}/ws/jobs/{job.id}/"
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()), "Origin": stack.url}
        received = []
        async with websockets.connect(url, additional_headers=headers) as socket:
            await socket.send(json.dumps({"type": "sync", "after_step": 0}))
            while len({m["step"] for m in received if m.get("type") == "metric"}) < 5:
                received.append(json.loads(await asyncio.wait_for(socket.recv(), timeout=120)))
        return received

    messages = asyncio.run(watch())
    steps = [m["step"] for m in messages if m["type"] == "metric"]
    assert len(set(steps)) >= 5 and all(m["train_loss"] is not None for m in messages if m["type"] == "metric")
    client.fine_tuning.jobs.cancel(job.id)


def test_a_stranger_cannot_watch_the_websocket(stack, client, long_file):
    import websockets
    import websockets.exceptions

    job = create_long_job(client, long_file.id, n_epochs=1)

    async def connect():
        async with websockets.connect(
            f"ws://127.0.0.1:{stack.port}/ws/jobs/{job.id}/", additional_headers={"Origin": stack.url}
        ) as socket:
            await socket.recv()

    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        asyncio.run(connect())
    assert refused.value.response.status_code == 403
    client.fine_tuning.jobs.cancel(job.id)


def test_zhipuai_sdk_runs_a_job_and_streams_chat(stack, long_file):
    from zhipuai import ZhipuAI

    zhipu = ZhipuAI(api_key=stack.api_key("admin"), base_url=stack.url + "/api/paas/v4/", max_retries=0)
    small = zhipu.files.create(file=("z.jsonl", chat_lines(8)), purpose="fine-tune")
    wait_until(
        lambda: (
            httpx.get(
                f"{stack.url}/v1/files/{small.id}", headers={"Authorization": f"Bearer {stack.api_key('admin')}"}
            ).json()["status"]
            == "processed"
        ),
        what="processing",
    )
    job = zhipu.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=small.id, hyperparameters={"n_epochs": 1}, suffix="zp"
    )
    done = wait_until(
        lambda: (j := zhipu.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        what="the zhipu job",
    )
    assert done.status == "succeeded"
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in zhipu.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            max_tokens=5,
            temperature=0.0,
        )
    ]
    assert "".join(pieces)
    events = zhipu.fine_tuning.jobs.list_events(job.id)
    assert any(e.type == "metrics" for e in events.data)
