"""Fixtures for evaluation tests: a user with a fine-tuned tiny model and its data, and running a run here.

Runs execute in this process (`run_now`), through the same serving path chat uses, on the tiny
model: tests that run them need `django_db(transaction=True)`, since the run's database writes
come from the event loop's helper thread.
"""

import json

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile

from datasets_app.models import Dataset
from deployments_app.models import ModelCard
from jobs_app.models import FineTuningJob

from ..test_model_square import BASE, make_adapter

__all__ = ["BASE", "EXACT", "chat_file", "job_on", "run_now"]


EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
    "operation": "eq",
}


@pytest.fixture(autouse=True)
def folders(settings, tmp_path, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FT_ARTIFACTS_DIR = tmp_path / "artifacts"
    settings.FT_EVAL_MAX_TOKENS = 8


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


def chat_file(owner, rows: list[tuple[str, str]], *, name: str = "heldout.jsonl") -> Dataset:
    """A processed chat file of (question, answer) pairs."""
    text = "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in rows
    ).encode()
    dataset = Dataset.objects.create(
        owner=owner, filename=name, bytes=len(text), status=Dataset.PROCESSED, examples=len(rows)
    )
    dataset.file.save(name, ContentFile(text), save=False)
    dataset.normalized.save(name, ContentFile(text), save=True)
    return dataset


@pytest.fixture
def heldout(alice) -> Dataset:
    return chat_file(alice, [(f"What is the code for item {i}?", f"code {i}") for i in range(6)])


def job_on(owner, data: Dataset, **fields) -> FineTuningJob:
    """A job of the tiny base model trained and validated on `data`."""
    return FineTuningJob.objects.create(
        owner=owner,
        base_model=BASE,
        training_file=data,
        training_file_ref=data.public_id,
        validation_file=data,
        validation_file_ref=data.public_id,
        **fields,
    )


@pytest.fixture
def card(alice, heldout, tmp_path, tiny_model_dir) -> ModelCard:
    job = job_on(alice, heldout, status="succeeded", suffix="ev", resolved={"n_epochs": 1, "lora_rank": 4})
    folder = make_adapter(tiny_model_dir, tmp_path / "run" / "adapter")
    return ModelCard.objects.create(
        model_id=job.fine_tuned_model_id, owner=alice, job=job, base_model=BASE, method="lora", path=str(folder)
    )


def run_now(run):
    """Execute a queued run here, as the evaluations worker would, and return it re-read."""
    from evals_app.services import run_execute

    run_execute(run_id=run.pk)
    run.refresh_from_db()
    return run
