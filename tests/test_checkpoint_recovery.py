"""A worker's run with the real engine: retention keeps the rows in step with the disk, a damaged
checkpoint is skipped on resume, and a full disk fails the job saying so, earlier checkpoints kept."""

import json
import os

import pytest
from django.core.files.base import ContentFile

from datasets_app import services as dataset_services
from datasets_app.models import Dataset
from jobs_app import services
from jobs_app.models import FineTuningJob
from llm.train import checkpoint as ckpt

from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def chat_file(alice, monkeypatch) -> Dataset:
    monkeypatch.setattr("datasets_app.tasks.compute_statistics.delay", lambda pk: None)
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is the code for box {i}?"},
                {"role": "assistant", "content": f"Box {i} has code {i * 7 % 10}."},
            ]
        }
        for i in range(8)
    ]
    dataset = Dataset(owner=alice, filename="chat.jsonl", bytes=0)
    dataset.file.save("chat.jsonl", ContentFile("".join(json.dumps(line) + "\n" for line in lines)), save=False)
    dataset.bytes = dataset.file.size
    dataset.save()
    dataset_services.dataset_validate(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.PROCESSED, dataset.status_details
    return dataset


@pytest.fixture
def run(alice, chat_file, monkeypatch):
    """Create a job (queued, not sent to a worker) and run it here with the real engine."""
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)

    def create_and_run(**hyperparameters) -> FineTuningJob:
        job = services.job_create(
            owner=alice,
            model=BASE,
            training_file=chat_file.public_id,
            hyperparameters={"batch_size": 4, "learning_rate_multiplier": 10, **hyperparameters},
        )
        services.job_run(job_id=job.pk, worker="test")
        job.refresh_from_db()
        return job

    return create_and_run


def messages(job) -> list[str]:
    return list(job.events.filter(type="message").values_list("message", flat=True))


def test_the_checkpoints_listed_are_the_ones_retention_kept(run):
    job = run(n_epochs=3, save_every=1)  # 6 steps, a checkpoint at each; the engine keeps the newest 2

    assert job.status == FineTuningJob.SUCCEEDED
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [5, 6]
    assert ckpt.checkpoint_steps(job.output_dir) == [5, 6]


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(run):
    job = run(n_epochs=3, save_every=1)
    newest = job.checkpoints.get(step=6)
    weights = next(ckpt.checkpoint_dir(job.output_dir, 6).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.QUEUED, fine_tuned_model="")

    services.job_run(job_id=job.pk, worker="test-2")
    job.refresh_from_db()

    assert job.status == FineTuningJob.SUCCEEDED, job.error
    said = messages(job)
    assert any("The checkpoint at step 6 cannot be read (step-6: SafetensorError" in m for m in said), said
    assert f"Training started on test-2:{os.getpid()} from the checkpoint at step 5 (attempt 2)." in said
    assert job.checkpoints.get(step=6).pk != newest.pk  # step 6 trained again and saved afresh
    assert ckpt.damage(ckpt.checkpoint_dir(job.output_dir, 6)) is None
    steps = list(job.events.filter(type="metrics").values_list("step", flat=True))
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # each step shown once


def test_a_checkpoint_that_does_not_fit_fails_the_job_saying_so_and_keeps_the_earlier_ones(run, monkeypatch):
    real = ckpt.shutil.disk_usage
    seen = []

    def disk_usage(path):
        seen.append(path)
        usage = real(path)
        return usage if len(seen) == 1 else usage._replace(free=2**20)  # the disk fills after the first

    monkeypatch.setattr(ckpt.shutil, "disk_usage", disk_usage)

    job = run(n_epochs=2)  # checkpoints at the end of each epoch: steps 2 and 4

    assert job.status == FineTuningJob.FAILED
    assert job.error["code"] == "disk_full"
    assert job.error["message"].startswith("Not enough disk space for the checkpoint at step 4")
    assert list(job.checkpoints.values_list("step", flat=True)) == [2]
    assert ckpt.damage(ckpt.checkpoint_dir(job.output_dir, 2)) is None
