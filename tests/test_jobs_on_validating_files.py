"""A job created on files still being validated waits in validating_files, then starts when they are
processed, or fails with their own errors; the periodic sweep moves on a job whose call was missed.

In-process: the real validator (`dataset_validate`) and the real API, with the tasks each step sends
recorded instead of queued. `test_the_zhipuai_flow_runs_with_no_wait` then runs the same flow through
the real zhipuai SDK against the live stack.
"""

import json
import time
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from datasets_app.models import Dataset
from datasets_app.services import dataset_validate
from finetune_site.errors import InvalidState
from finetune_site.models import ApiKey, Notification
from jobs_app import services
from jobs_app.models import FineTuningJob
from llm.bundled import TINY_MODEL_ID

from .test_api_auth import auth

pytestmark = pytest.mark.django_db

PREFIXES = ["/v1", "/api/paas/v4"]


def chat_lines(n: int) -> bytes:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is the code for box {i}?"},
                {"role": "assistant", "content": f"Box {i} has code {i * 7 % 10}."},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def preference_lines(n: int) -> bytes:
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"Is parcel {i} ready?"}]},
            "preferred_output": [{"role": "assistant", "content": f"Yes, parcel {i} is ready."}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        for i in range(n)
    ]
    return "".join(json.dumps(pair) + "\n" for pair in pairs).encode()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def headers(alice):
    return auth(ApiKey.issue(alice, name="test")[1])


@pytest.fixture
def sent(settings, tmp_path, tiny_model_dir, monkeypatch):
    """The tasks sent, by name: validations are run by the test itself, with dataset_validate."""
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FT_ARTIFACTS_DIR = tmp_path / "artifacts"
    tasks = {"validate": [], "train": [], "holdout": [], "statistics": []}
    monkeypatch.setattr("datasets_app.tasks.validate_dataset.delay", lambda pk: tasks["validate"].append(pk))
    monkeypatch.setattr("datasets_app.tasks.compute_statistics.delay", lambda pk: tasks["statistics"].append(pk))
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: tasks["train"].append(pk))
    monkeypatch.setattr("jobs_app.tasks.prepare_holdout.delay", lambda *args: tasks["holdout"].append(list(args)))
    return tasks


@pytest.fixture
def run_commits(django_capture_on_commit_callbacks):
    """Run what each step queues for after its commit, as the real database would."""

    def run(step, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return step(*args, **kwargs)

    return run


def upload(client, headers, content: bytes, prefix="/v1", name="train.jsonl") -> Dataset:
    response = client.post(
        f"{prefix}/files", {"file": SimpleUploadedFile(name, content), "purpose": "fine-tune"}, **headers
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "uploaded"
    return Dataset.objects.get(public_id=response.json()["id"])


def create(client, headers, prefix="/v1", **body):
    return client.post(
        f"{prefix}/fine_tuning/jobs", {"model": TINY_MODEL_ID, **body}, content_type="application/json", **headers
    )


def validate(run_commits, dataset: Dataset) -> Dataset:
    """What the validation worker does with the file, the call to the jobs waiting on it included."""
    return run_commits(dataset_validate, dataset_id=dataset.pk)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_job_created_right_after_upload_waits_then_queues_once_the_file_is_processed(
    client, headers, sent, run_commits, prefix
):
    dataset = run_commits(upload, client, headers, chat_lines(8), prefix)
    assert sent["validate"] == [dataset.pk]

    response = run_commits(create, client, headers, prefix, training_file=dataset.public_id, suffix="early")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "validating_files" and body["training_file"] == dataset.public_id
    assert body["error"] is None and body["method"]["type"] == "supervised"
    assert sent["train"] == []  # nothing trains on a file nobody has read yet
    job = FineTuningJob.objects.get(public_id=body["id"])
    assert job.resolved == {}

    validate(run_commits, dataset)

    shown = client.get(f"{prefix}/fine_tuning/jobs/{job.public_id}", **headers).json()
    assert shown["status"] == "queued" and shown["error"] is None
    assert sent["train"] == [job.pk]
    job.refresh_from_db()
    assert job.objective == FineTuningJob.SFT and job.resolved["total_steps"] > 0
    messages = list(job.events.values_list("message", flat=True))
    assert f"It starts once {dataset.public_id} is validated." in messages[0]
    assert messages[-1] == f"{dataset.public_id} validated; job queued."

    # A second call (the sweep, a validation run twice) finds nothing left to do.
    assert run_commits(services.jobs_advance_waiting_on, dataset_id=dataset.pk) == []
    assert run_commits(services.requeue_lost_jobs) == []
    assert sent["train"] == [job.pk]


def test_a_file_with_a_bad_line_fails_the_job_with_that_line_in_its_error(client, headers, sent, run_commits, alice):
    lines = chat_lines(3).splitlines(keepends=True)
    lines.insert(1, b'{"messages": [{"role": "user", "content": "no answer"}\n')  # line 2: broken JSON
    dataset = run_commits(upload, client, headers, b"".join(lines))
    job_id = run_commits(create, client, headers, training_file=dataset.public_id).json()["id"]

    validate(run_commits, dataset)

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", **headers).json()
    assert job["status"] == "failed" and sent["train"] == []
    assert job["error"]["code"] == "invalid_training_file" and job["error"]["param"] == "training_file"
    message = job["error"]["message"]
    assert message.startswith(f"Training file {dataset.public_id} failed validation.")
    assert "line 2" in message  # the file's own report, as GET /v1/files shows it
    status_details = client.get(f"/v1/files/{dataset.public_id}", **headers).json()["status_details"]
    assert "line 2" in status_details and status_details in message
    assert Notification.objects.filter(user=alice, level="error", message__contains=job_id).exists()

    # Nothing was ever resolved for it, so there is nothing to run again.
    with pytest.raises(InvalidState, match="create a new job"):
        services.job_retry(job=FineTuningJob.objects.get(public_id=job_id))


def test_a_job_with_two_files_queues_only_once_both_are_processed(client, headers, sent, run_commits):
    train = run_commits(upload, client, headers, chat_lines(8))
    valid = run_commits(upload, client, headers, chat_lines(3), name="valid.jsonl")
    response = run_commits(create, client, headers, training_file=train.public_id, validation_file=valid.public_id)
    job = FineTuningJob.objects.get(public_id=response.json()["id"])

    validate(run_commits, train)
    job.refresh_from_db()
    assert job.status == FineTuningJob.VALIDATING and job.resolved == {} and sent["train"] == []

    validate(run_commits, valid)
    job.refresh_from_db()
    assert job.status == FineTuningJob.QUEUED and sent["train"] == [job.pk]
    assert (job.training_file_id, job.validation_file_id) == (train.pk, valid.pk)
    assert job.validation_file_ref == valid.public_id


def test_a_bad_validation_file_fails_the_job_as_invalid_validation_file(client, headers, sent, run_commits):
    train = run_commits(upload, client, headers, chat_lines(8))
    valid = run_commits(upload, client, headers, b"not json\n", name="valid.jsonl")
    response = run_commits(create, client, headers, training_file=train.public_id, validation_file=valid.public_id)

    validate(run_commits, valid)  # fails at once, without waiting for the training file

    job = FineTuningJob.objects.get(public_id=response.json()["id"])
    assert job.status == FineTuningJob.FAILED and sent["train"] == []
    assert job.error["code"] == "invalid_validation_file" and job.error["param"] == "validation_file"
    assert "line 1" in job.error["message"]


def test_the_sweep_moves_on_a_job_whose_call_was_missed(
    client, headers, sent, run_commits, django_capture_on_commit_callbacks
):
    dataset = run_commits(upload, client, headers, chat_lines(8))
    job_id = run_commits(create, client, headers, training_file=dataset.public_id).json()["id"]
    FineTuningJob.objects.filter(public_id=job_id).update(queued_at=timezone.now() - timedelta(hours=1))
    assert run_commits(services.requeue_lost_jobs) == []  # still being validated: nothing is lost

    with django_capture_on_commit_callbacks(execute=False) as dropped:  # the worker was killed before the call
        dataset_validate(dataset_id=dataset.pk)
    assert len(dropped) == 2  # token statistics, and the call to the waiting job
    assert FineTuningJob.objects.get(public_id=job_id).status == FineTuningJob.VALIDATING

    assert run_commits(services.requeue_lost_jobs) == [job_id]
    job = FineTuningJob.objects.get(public_id=job_id)
    assert job.status == FineTuningJob.QUEUED and sent["train"] == [job.pk]
    assert run_commits(services.requeue_lost_jobs) == [] and sent["train"] == [job.pk]


def test_a_file_deleted_while_a_job_waits_on_it_fails_the_job(client, headers, sent, run_commits):
    dataset = run_commits(upload, client, headers, chat_lines(8))
    job_id = run_commits(create, client, headers, training_file=dataset.public_id).json()["id"]
    refused = client.delete(f"/v1/files/{dataset.public_id}", **headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_in_use"

    Dataset.objects.filter(pk=dataset.pk).delete()  # as an administrator may
    assert run_commits(services.requeue_lost_jobs) == [job_id]

    job = FineTuningJob.objects.get(public_id=job_id)
    assert job.status == FineTuningJob.FAILED and job.error["code"] == "invalid_training_file"
    assert job.error["message"] == (
        f"Training file {dataset.public_id} was deleted before it was validated; upload it again and create a new job."
    )


def test_a_hold_out_waits_for_the_file_then_splits_it(client, headers, sent, run_commits):
    dataset = run_commits(upload, client, headers, chat_lines(8))
    response = run_commits(create, client, headers, training_file=dataset.public_id, holdout_percent=25)
    job = FineTuningJob.objects.get(public_id=response.json()["id"])
    FineTuningJob.objects.filter(pk=job.pk).update(queued_at=timezone.now() - timedelta(hours=1))
    assert run_commits(services.requeue_lost_jobs) == [] and sent["holdout"] == []  # no split of an unread file

    validate(run_commits, dataset)
    job.refresh_from_db()
    assert job.status == FineTuningJob.VALIDATING and job.resolved and sent["holdout"] == [[job.pk, 25]]

    run_commits(services.job_prepare_holdout, job_id=job.pk, percent=25)
    job.refresh_from_db()
    assert job.status == FineTuningJob.QUEUED and sent["train"] == [job.pk]
    assert job.training_file.examples == 6 and job.validation_file.examples == 2


def test_the_file_decides_the_objective_unless_one_was_asked_for(client, headers, sent, run_commits):
    pairs = run_commits(upload, client, headers, preference_lines(6), name="pairs.jsonl")
    decided = run_commits(create, client, headers, training_file=pairs.public_id).json()["id"]
    asked = run_commits(create, client, headers, training_file=pairs.public_id, method={"type": "supervised"}).json()[
        "id"
    ]

    validate(run_commits, pairs)

    dpo = FineTuningJob.objects.get(public_id=decided)
    assert (dpo.status, dpo.objective) == (FineTuningJob.QUEUED, FineTuningJob.DPO)
    assert client.get(f"/v1/fine_tuning/jobs/{decided}", **headers).json()["method"]["type"] == "dpo"
    refused = FineTuningJob.objects.get(public_id=asked)
    assert refused.status == FineTuningJob.FAILED and refused.error["code"] == "invalid_training_file"
    assert "holds preference pairs" in refused.error["message"]
    assert sent["train"] == [dpo.pk]


def test_limits_still_apply_at_creation_and_a_cancelled_job_stays_cancelled(
    client, headers, sent, run_commits, settings
):
    settings.FT_MAX_ACTIVE_JOBS_PER_USER = 1
    dataset = run_commits(upload, client, headers, chat_lines(8))
    job_id = run_commits(create, client, headers, training_file=dataset.public_id).json()["id"]
    busy = create(client, headers, training_file=dataset.public_id)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_active_jobs"

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", **headers).json()["status"] == "cancelled"
    validate(run_commits, dataset)
    assert FineTuningJob.objects.get(public_id=job_id).status == FineTuningJob.CANCELLED and sent["train"] == []


@pytest.mark.live
@pytest.mark.timeout(600)
def test_the_zhipuai_flow_runs_with_no_wait(stack):
    """The seed guide's zhipuai flow: upload, create the task at once, poll, chat with the model code, delete."""
    from zhipuai import APIStatusError, ZhipuAI

    zhipu = ZhipuAI(api_key=stack.api_key("admin"), base_url=stack.url + "/api/paas/v4/", max_retries=0)
    uploaded = zhipu.files.create(file=("guide.jsonl", chat_lines(8)), purpose="fine-tune")
    job = zhipu.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=uploaded.id, hyperparameters={"n_epochs": 1}, suffix="guide"
    )
    assert job.status in ("validating_files", "queued", "running"), job

    deadline = time.monotonic() + 300
    while (job := zhipu.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the job is still {job.status}"
        time.sleep(0.5)  # the poll interval of the guide's loop
    assert job.status == "succeeded", job.error

    answer = zhipu.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is the code for box 3?"}], max_tokens=8
    )
    assert answer.choices[0].message.content

    deleted = zhipu.fine_tuning.models.delete(fine_tuned_model=job.fine_tuned_model)
    assert (deleted.model_name, deleted.delete_status) == (job.fine_tuned_model, "deleted")
    with pytest.raises(APIStatusError) as gone:
        zhipu.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert gone.value.status_code == 404
