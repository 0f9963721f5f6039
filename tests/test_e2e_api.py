"""The whole path through the official openai SDK against the live stack."""

import time

import httpx
import openai
import pytest

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID

from .live import chat_lines, login_cookies

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def alice(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("alice"), max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def bob(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("bob"), max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def processed_file(alice):
    uploaded = alice.files.create(file=("train.jsonl", chat_lines(24)), purpose="fine-tune")
    return alice.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)


def wait_for_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def test_it_lists_the_bundled_base_model(alice):
    ids = [m.id for m in alice.models.list()]
    assert any(BUNDLED_MODEL_ID in model_id for model_id in ids)
    assert TINY_MODEL_ID in ids


def test_it_runs_upload_job_and_chat_end_to_end(alice, processed_file):
    assert processed_file.status == "processed"
    job = alice.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=processed_file.id,
        suffix="e2e",
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        seed=7,
    )
    assert job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == 2

    done = wait_for_job(alice, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{TINY_MODEL_ID}:alice:e2e:")
    assert done.trained_tokens and done.trained_tokens > 0
    assert isinstance(done.finished_at, int)

    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "loss", "current_steps"} <= set(metrics[0].data)
    assert job.id in [j.id for j in alice.fine_tuning.jobs.list()]
    assert done.fine_tuned_model in [m.id for m in alice.models.list()]

    answer = alice.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the code for item 3?"}],
        max_tokens=8,
    )
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        alice.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_the_real_model_answers_through_the_api(alice):
    answer = alice.chat.completions.create(
        model=BUNDLED_MODEL_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in answer.choices[0].message.content


def test_a_bad_upload_names_the_line(alice):
    content = chat_lines(2) + b'{"messages": [{"role": "bot", "content": "hi"}]}\n'
    uploaded = alice.files.create(file=("bad.jsonl", content), purpose="fine-tune")
    result = alice.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=60)
    assert result.status == "error"
    assert "line 3" in result.status_details


def test_an_unknown_model_is_a_400_in_the_error_shape(alice, processed_file):
    with pytest.raises(openai.BadRequestError) as caught:
        alice.fine_tuning.jobs.create(model="no-such-model", training_file=processed_file.id)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "model"


def test_a_missing_file_is_a_400(alice):
    with pytest.raises(openai.BadRequestError) as caught:
        alice.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file="file-doesnotexist")
    assert caught.value.body["param"] == "training_file"


def test_bob_cannot_see_alices_file(bob, processed_file):
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(processed_file.id)
    assert processed_file.id not in [f.id for f in bob.files.list()]


def test_a_wrong_key_is_a_401(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="ftk0000.bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_healthz_reports_every_part_to_staff_and_only_the_status_to_anyone(stack):
    anyone = httpx.get(stack.url + "/healthz")
    assert anyone.status_code == 200 and anyone.json() == {"status": "ok", "down": []}
    report = httpx.get(stack.url + "/healthz", cookies=login_cookies(stack)).json()
    assert report["database"]["ok"] and report["redis"]["ok"]
    assert report["queues"]["training"]["workers"] >= 1
    assert report["queues"]["default"]["workers"] >= 1
    assert report["queues"]["serving"]["workers"] >= 1
    assert report["queues"]["notifications"]["workers"] >= 1 and report["queues"]["housekeeping"]["workers"] >= 1
