"""A model's life over three machines sharing one bucket (FT_STORE), each with its own cache folder, run
here in one process by switching FT_SHARED_DIR: A takes the upload, B trains, C resumes and trains on
from B's work and builds the merged model, and A's web sells the download. No machine sees another's
folder; everything goes through the bucket (moto's S3 server)."""

import io
import os
import shutil
import zipfile

import boto3
import pytest
from django.urls import reverse

from deployments_app.catalog import exports
from deployments_app.catalog import services as catalog_services
from deployments_app.models import ModelCard
from jobs_app import services
from jobs_app.models import FineTuningJob
from llm.train.checkpoint import damage

from .live import s3_server
from .test_checkpoint_recovery import chat_file, messages, run  # noqa: F401 - the same data, runs and events
from .test_model_square import BASE, alice, body_of  # noqa: F401 - the same user, base model and download reader

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def s3_env():
    with s3_server() as env:
        yield env


@pytest.fixture(autouse=True)
def machines(settings, tmp_path, tiny_model_dir, s3_env, monkeypatch):
    """machines("b") makes this process machine B; it starts as A, which takes the upload."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    bucket = f"ft-runs-{os.urandom(4).hex()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.FT_STORE = f"s3://{bucket}/console"

    def switch(name: str) -> None:
        settings.FT_SHARED_DIR = tmp_path / name
        settings.MEDIA_ROOT = tmp_path / name / "media"
        settings.FT_ARTIFACTS_DIR = tmp_path / name / "artifacts"

    switch("a")
    switch.bucket = bucket
    return switch


def test_b_trains_on_as_uploaded_on_a_and_c_resumes_trains_on_and_exports_what_b_left(
    machines, run, alice, chat_file, tmp_path
):
    machines("b")
    job = run(n_epochs=2, save_every=1)
    assert job.status == FineTuningJob.SUCCEEDED, job.error
    assert (tmp_path / "b" / "media").is_dir() and not (tmp_path / "b" / "media").is_symlink()
    stored = _keys(machines.bucket)
    assert any(key.startswith("console/media/datasets/normalized/") for key in stored)
    assert f"console/artifacts/jobs/{job.public_id}/adapter/adapter_config.json" in stored
    steps = sorted(job.checkpoints.values_list("step", flat=True))
    assert steps and all(
        any(key.startswith(f"console/artifacts/jobs/{job.public_id}/checkpoints/step-{step}/") for key in stored)
        for step in steps
    ), (steps, stored)

    # C has none of it, and reads every path the rows hold under its own folder.
    machines("c")
    newest = services._resumable_checkpoint(job)
    assert newest is not None and newest.step == steps[-1]
    assert newest.path.startswith(str((tmp_path / "c").resolve())) and damage(newest.path) is None

    # C resumes B's run (as after B's worker was lost) from B's newest checkpoint, and finishes it.
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.QUEUED, fine_tuned_model="")
    services.job_run(job_id=job.pk, worker="c")
    job.refresh_from_db()
    assert job.status == FineTuningJob.SUCCEEDED, job.error
    assert any(f"from the checkpoint at step {steps[-1]}" in m for m in messages(job)), messages(job)

    # C trains on from the model B made: the adapter comes from the bucket.
    shutil.rmtree(tmp_path / "c")
    on_top = services.job_create(
        owner=alice, model=job.fine_tuned_model, training_file=chat_file.public_id, hyperparameters={"n_epochs": 1}
    )
    services.job_run(job_id=on_top.pk, worker="c")
    on_top.refresh_from_db()
    assert on_top.status == FineTuningJob.SUCCEEDED, on_top.error
    assert on_top.init_model == job.fine_tuned_model

    # C builds the merged model; A, which never had the adapter, says it is ready and serves the download.
    card = ModelCard.objects.get(model_id=job.fine_tuned_model)
    catalog_services.model_merge(card_id=card.pk)
    machines("a")
    assert not (tmp_path / "a" / "artifacts").exists()
    assert exports.merged_state(exports.export_dir(card)) == "ready"


def test_a_web_machine_sells_downloads_of_what_others_made(machines, run, client, alice, tmp_path):
    machines("b")
    job = run(n_epochs=1)
    card = ModelCard.objects.get(model_id=job.fine_tuned_model)
    catalog_services.model_merge(card_id=card.pk)

    machines("a")
    for name in ("model_download_adapter", "model_download_merged"):
        response = client.get(reverse(name, args=[job.fine_tuned_model]))
        assert response.status_code == 200, (name, response.status_code)
        names = zipfile.ZipFile(io.BytesIO(body_of(response))).namelist()
        assert any(n.endswith(("adapter_config.json", "config.json")) for n in names), names

    # Deleting the model on A removes its objects from the bucket, though A only ever had copies.
    catalog_services.model_delete(user=alice, model_id=job.fine_tuned_model)
    assert not [k for k in _keys(machines.bucket) if k.startswith(f"console/artifacts/jobs/{job.public_id}/adapter/")]


def _keys(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", ())]
