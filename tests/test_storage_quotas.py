"""Per-user storage quotas: what one account's data takes on disk, and the checks before anything adds to it.

Counted: datasets (recorded size plus the normalized copy), job folders, the folder a model keeps after its
job was deleted, merged builds; never another account's. Checked at upload (`check_room`, called directly
here), at job creation (API and page), before every checkpoint of a real training run, and before a
merged-model build (on the page and again on the worker).
"""

import errno

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services as dataset_services
from datasets_app.models import Dataset
from deployments_app.catalog import services as catalog_services
from deployments_app.catalog.exports import export_dir, merged_state
from deployments_app.models import ModelCard
from finetune_site import quotas
from finetune_site.api_errors import status_of
from finetune_site.errors import CapacityExceeded
from finetune_site.models import ApiKey, Notification
from jobs_app import services as job_services
from jobs_app.models import FineTuningJob
from llm.train import checkpoint as ckpt

from .test_api_auth import auth
from .test_checkpoint_recovery import chat_file, run  # noqa: F401 - a real run of the engine, in this process
from .test_model_square import BASE, alice, card, folders  # noqa: F401 - the same user, folders, base and card

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob(db):
    return get_user_model().objects.create_user("bob", password="pw-bob-123456")


def dataset_of(owner, size: int, *, normalized: int = 0) -> Dataset:
    """A dataset whose upload was size bytes (as recorded) with a normalized copy of `normalized` bytes."""
    dataset = Dataset(owner=owner, filename="d.jsonl", bytes=size, status=Dataset.PROCESSED, examples=10)
    dataset.file.save("d.jsonl", ContentFile(b"x" * size), save=False)
    if normalized:
        dataset.normalized.save("d.chat.jsonl", ContentFile(b"y" * normalized), save=False)
    dataset.save()
    return dataset


def write(path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"z" * size)


def job_of(owner, dataset, **fields) -> FineTuningJob:
    return FineTuningJob.objects.create(
        owner=owner, base_model=BASE, training_file=dataset, training_file_ref=dataset.public_id, **fields
    )


def test_usage_counts_datasets_job_folders_orphaned_models_and_merged_builds(alice, settings):
    dataset = dataset_of(alice, 1000, normalized=700)
    job = job_of(alice, dataset, status="succeeded")
    write(job.output_dir / "checkpoints" / "step-2" / "adapter_model.safetensors", 5000)
    write(job.output_dir / "adapter" / "adapter_model.safetensors", 2000)
    # A model whose job was deleted keeps the rest of the run's folder (llm/train writes logs beside it).
    kept = settings.FT_ARTIFACTS_DIR / "jobs" / "ftjob-gone"
    write(kept / "adapter" / "adapter_model.safetensors", 3000)
    write(kept / "metrics.jsonl", 100)
    orphan = ModelCard.objects.create(
        model_id="ft:gone", owner=alice, base_model=BASE, path=str(kept / "adapter"), size_bytes=3000
    )
    write(export_dir(orphan) / "merged" / "model.safetensors", 4000)

    assert quotas.storage_used(alice) == 1000 + 700 + 5000 + 2000 + 3100 + 4000


def test_another_users_data_never_counts_against_you(alice, bob, settings):
    settings.FT_STORAGE_QUOTA_BYTES = 10_000
    dataset_of(alice, 2000)
    bobs = dataset_of(bob, 9000)
    write(job_of(bob, bobs).output_dir / "checkpoints" / "step-1" / "training_state.pt", 50_000)

    quotas.check_room(alice, 8000)  # alice: 2000 + 8000 fits

    assert quotas.storage_used(alice) == 2000 and quotas.storage_used(bob) == 59_000
    with pytest.raises(CapacityExceeded):
        quotas.check_room(bob, 1)


def test_an_upload_past_the_quota_is_refused_saying_usage_and_quota(alice, settings):
    settings.FT_STORAGE_QUOTA_BYTES = 3 * 2**20
    dataset_of(alice, 2 * 2**20)
    quotas.check_room(alice, 2**20)  # exactly to the quota

    with pytest.raises(CapacityExceeded) as refused:
        quotas.check_room(alice, 2**20 + 1)

    error = refused.value
    assert error.code == "storage_quota_exceeded" and error.param == "file" and status_of(error) == 400
    assert error.message.startswith(
        "Storage quota exceeded: your data takes 2.0 MB of your 3.0 MB storage quota (FT_STORAGE_QUOTA_BYTES), "
        "and this needs 1.0 MB more."
    )


def test_the_upload_api_split_and_dedupe_refuse_past_the_quota_and_store_nothing(client, alice, settings):
    settings.FT_STORAGE_QUOTA_BYTES = 3000
    source = dataset_of(alice, 1200, normalized=1000)  # 2200 bytes used; its parts or its copy would add 1200 more
    key = auth(ApiKey.issue(alice, name="t")[1])
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    upload = SimpleUploadedFile("big.jsonl", line * 20)  # 1.8 KB, past the 1000 bytes left
    rows_before = Dataset.objects.count()

    uploaded = client.post("/v1/files", {"file": upload, "purpose": "fine-tune"}, **key)
    split = client.post(f"/v1/files/{source.public_id}/split", {"validation_percent": 20}, "application/json", **key)
    dedupe = client.post(f"/v1/files/{source.public_id}/dedupe", {}, "application/json", **key)

    for response in (uploaded, split, dedupe):
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert "this needs 1.8 KB more" in uploaded.json()["error"]["message"]
    assert Dataset.objects.count() == rows_before
    settings.FT_STORAGE_QUOTA_BYTES = 0
    assert (
        client.post(
            "/v1/files", {"file": SimpleUploadedFile("b.jsonl", line), "purpose": "fine-tune"}, **key
        ).status_code
        == 200
    )


def test_zero_means_no_storage_quota(alice, settings):
    settings.FT_STORAGE_QUOTA_BYTES = 0
    dataset_of(alice, 5000)

    quotas.check_room(alice, 10**15)
    quotas.check_not_full(alice)
    assert quotas.checkpoint_refusal(alice.pk, 10**15) is None


def test_a_job_is_refused_over_quota_by_the_api_and_on_the_page(client, alice, settings, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    settings.FT_STORAGE_QUOTA_BYTES = 4000
    dataset = dataset_of(alice, 4000)  # the quota, used up
    body = {"model": BASE, "training_file": dataset.public_id}

    refused = client.post(
        "/v1/fine_tuning/jobs", body, content_type="application/json", **auth(ApiKey.issue(alice, name="t")[1])
    )
    page = client.post("/jobs/new/", {**body, "method": "lora"})

    assert refused.status_code == 400, refused.content
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "storage_quota_exceeded"
    assert error["message"].startswith(
        "Storage quota exceeded: your data takes 3.9 KB of your 3.9 KB storage quota (FT_STORAGE_QUOTA_BYTES), "
        "so a new job would have no room for its checkpoints."
    )
    assert page.status_code == 200 and "Storage quota exceeded: your data takes 3.9 KB" in page.content.decode()
    assert not FineTuningJob.objects.exists()
    settings.FT_STORAGE_QUOTA_BYTES = 4001
    assert job_services.job_create(owner=alice, model=BASE, training_file=dataset.public_id).status == "queued"


@pytest.mark.django_db(transaction=True)
def test_a_checkpoint_past_the_quota_ends_the_run_as_a_full_disk_does_and_keeps_the_earlier_one(run, alice, settings):
    # The first checkpoint (about 400 KB with its optimizer state, the datasets 4 KB) fits; the
    # second, as big again while the first is still on disk, does not.
    settings.FT_STORAGE_QUOTA_BYTES = 640_000

    job = run(n_epochs=2)  # checkpoints at the end of each epoch: steps 2 and 4

    assert job.status == FineTuningJob.FAILED, job.error
    assert job.error["code"] == "disk_full"
    assert job.error["message"].startswith("No room for the checkpoint at step 4: it needs about ")
    assert "of your 625.0 KB storage quota (FT_STORAGE_QUOTA_BYTES), which leaves " in job.error["message"]
    assert "Earlier checkpoints are kept" in job.error["message"]
    assert list(job.checkpoints.values_list("step", flat=True)) == [2]
    assert ckpt.checkpoint_steps(job.output_dir) == [2]
    assert ckpt.damage(ckpt.checkpoint_dir(job.output_dir, 2)) is None
    assert not [p.name for p in (job.output_dir / "checkpoints").iterdir() if "partial" in p.name]
    assert quotas.storage_used(alice) <= settings.FT_STORAGE_QUOTA_BYTES


def test_the_engine_refuses_a_checkpoint_its_caller_has_no_room_for(tmp_path):
    asked = []
    ckpt.limit_room(tmp_path, lambda size: asked.append(size) or "it needs more than the 1 byte left.")
    try:
        with pytest.raises(ckpt.DiskFull) as full:
            ckpt.save_checkpoint(tmp_path, {"step": 3}, None, None, full=False, expected_bytes=1234)
    finally:
        ckpt.limit_room(tmp_path, None)

    assert asked == [1234] and full.value.errno == errno.EDQUOT
    assert full.value.strerror.startswith(
        "No room for the checkpoint at step 3: it needs more than the 1 byte left. Earlier checkpoints are kept"
    )
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_merged_build_past_the_quota_is_refused_on_the_page(client, card, settings, monkeypatch):
    queued = []
    monkeypatch.setattr("deployments_app.tasks.build_merged_model.delay", lambda pk: queued.append(pk))
    # Room for anything but a merged model, which is about the base model's size.
    settings.FT_STORAGE_QUOTA_BYTES = quotas.storage_used(card.owner) + 1000

    response = client.post(f"/models/{card.model_id}/merge/", follow=True)

    assert "Storage quota exceeded: your data takes" in response.content.decode()
    assert queued == [] and merged_state(export_dir(card)) == "absent"
    assert not export_dir(card).exists()


def test_a_queued_merged_build_is_not_started_once_the_quota_has_filled(card, settings, monkeypatch):
    monkeypatch.setattr("deployments_app.tasks.build_merged_model.delay", lambda pk: None)
    settings.FT_STORAGE_QUOTA_BYTES = 0
    assert catalog_services.model_merge_request(card=card) == "building"
    dataset_of(card.owner, 5000)  # meanwhile the owner uploads more
    settings.FT_STORAGE_QUOTA_BYTES = quotas.storage_used(card.owner) + 1000

    catalog_services.model_merge(card_id=card.pk)

    assert merged_state(export_dir(card)) == "absent"  # not built, and no longer shown as building
    notice = Notification.objects.get(user=card.owner)
    assert notice.level == "error"
    assert notice.message.startswith(f"The merged model of {card.model_id} was not built. Storage quota exceeded")


def test_splits_still_being_written_count_against_the_quota(alice, settings, monkeypatch):
    """A split answered at once but written later counts at once: asking again and again cannot pass the quota."""
    monkeypatch.setattr("datasets_app.tasks.derive_datasets.delay", lambda ids: None)  # the worker is busy
    settings.FT_STORAGE_QUOTA_BYTES = 4500
    source = dataset_of(alice, 1000, normalized=1000)
    first = dataset_services.dataset_split(dataset=source, validation_percent=20)

    assert [part.bytes for part in first] == [800, 200]
    assert quotas.storage_used(alice) == 3000
    dataset_services.dataset_dedupe(dataset=source)  # 4000 with it: another split's 1000 would not fit
    with pytest.raises(CapacityExceeded):
        dataset_services.dataset_split(dataset=source, validation_percent=20)
