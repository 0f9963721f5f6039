"""Split and dedupe run in a worker: answered at once, written outside any transaction, failures named, lost work found again."""

import errno
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.storage import FileSystemStorage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from datasets_app import services
from datasets_app.models import Dataset
from datasets_app.tasks import validate_dataset
from finetune_site import broker

from ..live import chat_lines
from ..test_datasets_pages import alice  # noqa: F401 - the same signed-in user

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def media(settings, tmp_path, tiny_model_dir):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FILE_UPLOAD_TEMP_DIR = tmp_path / "scratch"
    settings.FILE_UPLOAD_TEMP_DIR.mkdir()
    settings.FT_MODELS_DIR = tiny_model_dir.parent


@pytest.fixture
def eager_tasks():
    """Celery runs each task in the caller as soon as it is sent: the worker's code, without the worker."""
    from finetune_site.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


@pytest.fixture
def sent(monkeypatch):
    """The broker's side: which dataset tasks were sent, and with what."""
    from datasets_app import tasks

    calls = []

    def recorder(name: str):
        return lambda argument: calls.append((name, argument))

    for task in (tasks.validate_dataset, tasks.derive_datasets, tasks.compute_statistics):
        monkeypatch.setattr(task, "delay", recorder(task.name.rsplit(".", 1)[1]))
    return calls


def processed(alice, content: bytes, name="train.jsonl") -> Dataset:
    dataset = services.dataset_create(owner=alice, upload=SimpleUploadedFile(name, content))
    return services.dataset_validate(dataset_id=dataset.pk)


def stored_files(settings) -> list[str]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_it_answers_a_split_at_once_and_the_worker_writes_and_validates_the_parts(
    client, alice, settings, eager_tasks, django_capture_on_commit_callbacks
):
    source = processed(alice, chat_lines(20))
    before = stored_files(settings)

    with django_capture_on_commit_callbacks() as queued:  # sent to the worker only once the rows are committed
        response = client.post(
            f"/v1/files/{source.public_id}/split",
            {"validation_percent": 25, "seed": 1},
            content_type="application/json",
        )

    assert response.status_code == 200, response.content
    parts = response.json()["data"]
    assert [(part["filename"], part["status"]) for part in parts] == [
        ("train.train.jsonl", "uploaded"),
        ("train.validation.jsonl", "uploaded"),
    ]
    assert all(f"Being written from {source.public_id}" in part["status_details"] for part in parts)
    assert stored_files(settings) == before  # no file work in the request
    still_empty = client.get(f"/v1/files/{parts[0]['id']}/content")
    assert still_empty.status_code == 400 and still_empty.json()["error"]["code"] == "file_not_ready"
    page = client.get("/datasets/").content.decode()
    assert f"Being written from {source.public_id}" in page and 'hx-trigger="every 2s"' in page
    detail = client.get(f"/datasets/{parts[0]['id']}/").content.decode()
    assert "Writing this file in the background" in detail

    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()

    finished = [client.get(f"/v1/files/{part['id']}").json() for part in parts]
    assert [part["status"] for part in finished] == ["processed"] * 2
    assert not any("Being written" in (part["status_details"] or "") for part in finished)
    assert [Dataset.objects.get(public_id=part["id"]).examples for part in parts] == [15, 5]
    assert finished[0]["bytes"] == len(client.get(f"/v1/files/{parts[0]['id']}/content").getvalue())


def test_it_answers_a_dedupe_at_once_and_the_worker_writes_and_validates_it(
    client, alice, eager_tasks, django_capture_on_commit_callbacks
):
    source = processed(alice, chat_lines(4) + chat_lines(4))

    with django_capture_on_commit_callbacks() as queued:
        response = client.post(f"/v1/files/{source.public_id}/dedupe")
    assert response.status_code == 200, response.content
    copy = response.json()
    assert (copy["filename"], copy["status"]) == ("train.dedup.jsonl", "uploaded")
    assert not Dataset.objects.get(public_id=copy["id"]).file

    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()
    assert client.get(f"/v1/files/{copy['id']}").json()["status"] == "processed"
    assert Dataset.objects.get(public_id=copy["id"]).examples == 4


def test_bob_cannot_split_or_dedupe_alices_file(client, alice):
    source = processed(alice, chat_lines(5))
    client.force_login(get_user_model().objects.create_user("bob", password="pw-bob-123"))
    assert client.post(f"/v1/files/{source.public_id}/split", {}, content_type="application/json").status_code == 404
    assert client.post(f"/v1/files/{source.public_id}/dedupe").status_code == 404
    assert Dataset.objects.count() == 1


def test_split_settings_that_are_wrong_are_named_in_the_api_error(client, alice):
    source = processed(alice, chat_lines(5))
    response = client.post(
        f"/v1/files/{source.public_id}/split", {"validation_percent": "ten"}, content_type="application/json"
    )
    assert response.status_code == 400
    assert "Invalid split settings" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "validation_percent"
    not_an_object = client.post(f"/v1/files/{source.public_id}/split", [25], content_type="application/json")
    assert not_an_object.status_code == 400 and "must be an object" in not_an_object.json()["error"]["message"]
    assert Dataset.objects.count() == 1


class DiskFillsOnSecondFile(FileSystemStorage):
    """Local storage whose disk fills while the second file is written: part of it lands, then ENOSPC."""

    saves = None  # counted once armed

    def _save(self, name, content):
        if type(self).saves is not None:
            type(self).saves += 1
        if type(self).saves == 2:
            Path(self.path(name)).write_bytes(b'{"messages": [{"role": "us')
            raise OSError(errno.ENOSPC, "No space left on device")
        return super()._save(name, content)


@pytest.fixture
def disk_fills(settings):
    """Call it to arm the disk: the second file written after that fails."""
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": f"{__name__}.DiskFillsOnSecondFile"}}
    DiskFillsOnSecondFile.saves = None
    yield lambda: setattr(DiskFillsOnSecondFile, "saves", 0)
    DiskFillsOnSecondFile.saves = None


def test_a_write_that_fails_ends_every_part_in_error_with_the_reason_and_leaves_no_file(
    alice, settings, sent, disk_fills, caplog
):
    source = processed(alice, chat_lines(20))
    before = stored_files(settings)
    disk_fills()  # the upload's copies are done: the split's second part fills the disk

    parts = services.dataset_split(dataset=source, validation_percent=25, seed=1)
    assert services.dataset_derive(dataset_ids=[part.pk for part in parts]) == []

    for part in parts:
        part.refresh_from_db()
        assert part.status == Dataset.ERROR
        assert part.status_details == (
            f"Writing this file from {source.public_id} failed: OSError: [Errno 28] No space left on device"
        )
        assert not part.file
    assert stored_files(settings) == before  # the first part and the second's partial write are gone
    assert list(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir()) == []
    assert "writing " in caplog.text and "failed" in caplog.text


def test_a_holdout_split_that_fails_leaves_no_rows_and_no_files(alice, settings, disk_fills):
    source = processed(alice, chat_lines(20))
    before = stored_files(settings)
    disk_fills()

    with pytest.raises(OSError, match="No space left"):
        services.dataset_split(dataset=source, validation_percent=25, seed=1, validate=False)
    assert Dataset.objects.count() == 1
    assert stored_files(settings) == before
    assert list(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir()) == []


def test_an_upload_whose_row_cannot_be_written_leaves_no_file(alice, settings, monkeypatch):
    from django.db import OperationalError

    def locked(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(Dataset, "save", locked)
    with pytest.raises(OperationalError):
        services.dataset_create(owner=alice, upload=SimpleUploadedFile("train.jsonl", chat_lines(3)))
    assert stored_files(settings) == []


def test_a_part_whose_source_was_deleted_meanwhile_ends_in_error(alice, sent):
    source = processed(alice, chat_lines(6))
    copy = services.dataset_dedupe(dataset=source)
    services.dataset_delete(dataset=source)

    services.dataset_derive(dataset_ids=[copy.pk])
    copy.refresh_from_db()
    assert copy.status == Dataset.ERROR
    assert copy.status_details == "The source file was deleted or changed before train.dedup.jsonl was written."


def test_writing_and_validating_twice_does_no_harm(alice, settings, sent):
    source = processed(alice, chat_lines(20))
    parts = services.dataset_split(dataset=source, validation_percent=25, seed=1)
    ids = [part.pk for part in parts]

    first = services.dataset_derive(dataset_ids=ids)
    files = stored_files(settings)
    again = services.dataset_derive(dataset_ids=ids)
    for part in parts:
        services.dataset_validate(dataset_id=part.pk)

    assert [part.status for part in first] == [Dataset.PROCESSED] * 2 and again == []
    assert stored_files(settings) == files  # no second copy, no second normalized file
    assert [Dataset.objects.get(pk=pk).examples for pk in ids] == [15, 5]


def test_two_validations_of_one_file_record_once_and_keep_one_normalized_copy(alice, settings, monkeypatch):
    from datasets_app import validation

    dataset = services.dataset_create(owner=alice, upload=SimpleUploadedFile("train.jsonl", chat_lines(3)))
    read_lines = validation.validate_stream
    overtaken: list = []

    def requeued_copy_finishes_first(source, **options):
        report = read_lines(source, **options)
        if not overtaken:
            overtaken.append(None)
            overtaken[0] = services.dataset_validate(dataset_id=dataset.pk)
        return report

    monkeypatch.setattr(services, "validate_stream", requeued_copy_finishes_first)
    services.dataset_validate(dataset_id=dataset.pk)

    row = Dataset.objects.get(pk=dataset.pk)
    assert row.status == Dataset.PROCESSED and row.examples == 3
    normalized = [name for name in stored_files(settings) if name.startswith("datasets/normalized/")]
    assert normalized == [row.normalized.name] == [overtaken[0].normalized.name]


def test_the_reconciliation_requeues_lost_work_and_leaves_fresh_work_alone(
    alice, sent, broker_redis, django_capture_on_commit_callbacks
):
    long_ago = timezone.now() - timedelta(hours=1)
    source = processed(alice, chat_lines(6))
    Dataset.objects.filter(pk=source.pk).update(enqueued_at=long_ago, processed_at=long_ago)  # never counted

    lost_upload = services.dataset_create(owner=alice, upload=SimpleUploadedFile("lost.jsonl", chat_lines(3)))
    fresh_upload = services.dataset_create(owner=alice, upload=SimpleUploadedFile("fresh.jsonl", chat_lines(3)))
    lost_copy = services.dataset_dedupe(dataset=source)
    fresh_copy = services.dataset_dedupe(dataset=source)
    counted = processed(alice, chat_lines(2), name="counted.jsonl")
    services.dataset_compute_statistics(dataset_id=counted.pk)
    failed = processed(alice, b"not json\n", name="bad.jsonl")
    backlogged = services.dataset_create(owner=alice, upload=SimpleUploadedFile("late.jsonl", chat_lines(3)))
    for dataset in (lost_upload, lost_copy, counted, failed, backlogged):
        Dataset.objects.filter(pk=dataset.pk).update(enqueued_at=long_ago, processed_at=long_ago)
    broker.send_task(validate_dataset, backlogged.pk)  # still waiting its turn in the broker: not lost
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        queued = services.datasets_reconcile()

    assert sorted(queued) == sorted([lost_upload.public_id, lost_copy.public_id, source.public_id])
    assert sorted(sent) == sorted(
        [("validate_dataset", lost_upload.pk), ("derive_datasets", [lost_copy.pk]), ("compute_statistics", source.pk)]
    )
    assert fresh_upload.public_id not in queued and fresh_copy.public_id not in queued
    assert backlogged.public_id not in queued
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.datasets_reconcile() == []
    assert sent == []  # queued again only after another wait

    # What the worker then does with them ends each one.
    services.dataset_validate(dataset_id=lost_upload.pk)
    services.dataset_derive(dataset_ids=[lost_copy.pk])
    services.dataset_compute_statistics(dataset_id=source.pk)
    assert Dataset.objects.get(pk=lost_upload.pk).status == Dataset.PROCESSED
    assert Dataset.objects.get(pk=lost_copy.pk).status == Dataset.PROCESSED
    assert "tokens" in Dataset.objects.get(pk=source.pk).report


def test_the_reconciliation_runs_on_the_housekeeping_queue_and_expires(settings):
    assert settings.CELERY_TASK_ROUTES["datasets_app.tasks.reconcile_datasets"] == {"queue": "housekeeping"}
    entry = settings.CELERY_BEAT_SCHEDULE["reconcile-datasets"]
    assert entry["task"] == "datasets_app.tasks.reconcile_datasets"
    assert entry["options"]["expires"] <= entry["schedule"]
