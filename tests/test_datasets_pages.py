"""Datasets in the app: upload, background validation, token statistics, preview, split, dedupe, delete."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services
from datasets_app.models import Dataset
from jobs_app.models import FineTuningJob

from .live import chat_lines

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


@pytest.fixture(autouse=True)
def media(settings, tmp_path, tiny_model_dir):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FT_MODELS_DIR = tiny_model_dir.parent


def upload(client, content: bytes, name="train.jsonl") -> Dataset:
    response = client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content)})
    assert response.status_code == 302
    dataset = Dataset.objects.latest("id")
    services.dataset_validate(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    return dataset


def test_an_upload_is_validated_and_listed(client, alice):
    dataset = upload(client, chat_lines(12))
    assert dataset.status == Dataset.PROCESSED and dataset.examples == 12
    page = client.get("/datasets/").content.decode()
    assert dataset.public_id in page and "ready" in page


def test_a_bad_line_is_named_on_the_detail_page(client, alice):
    content = chat_lines(3) + b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    dataset = upload(client, content)
    assert dataset.status == Dataset.ERROR
    page = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    assert "line 4" in page and "no_assistant_message" in page


def test_an_oversized_upload_gets_a_clear_message(client, alice, settings):
    settings.FT_MAX_UPLOAD_BYTES = 100
    response = client.post("/datasets/upload/", {"file": SimpleUploadedFile("big.jsonl", chat_lines(10))}, follow=True)
    assert "over the limit of 100 bytes" in response.content.decode()
    assert not Dataset.objects.exists()


def test_token_statistics_are_stored_and_shown(client, alice):
    dataset = upload(client, chat_lines(12))
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    tokens = dataset.report["tokens"]
    assert tokens["examples"] == 12 and 0 < tokens["trained_tokens"] < tokens["total_tokens"]
    page = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    assert "Trained (assistant) tokens" in page and 'data-figure="token-histogram"' in page


def test_the_preview_highlights_trained_tokens_and_shows_conversions(client, alice):
    alpaca = b"\n".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}!"}).encode() for i in range(3)) + b"\n"
    dataset = upload(client, alpaca, name="alpaca.jsonl")
    page = client.get(f"/datasets/{dataset.public_id}/preview/").content.decode()
    assert "converted from alpaca" in page
    assert '<mark class="trained">0!' in page


def test_split_creates_new_datasets_and_keeps_the_original(client, alice):
    dataset = upload(client, chat_lines(20))
    created = services.dataset_split(dataset=dataset, validation_percent=25, seed=1)
    sizes = [len([l for l in d.file.open("rb") if l.strip()]) for d in created]
    assert sizes == [15, 5]
    assert Dataset.objects.filter(pk=dataset.pk).exists()


def test_dedupe_drops_exact_duplicates(client, alice):
    dataset = upload(client, chat_lines(5) + chat_lines(5))
    copy = services.dataset_dedupe(dataset=dataset)
    assert len([l for l in copy.file.open("rb") if l.strip()]) == 5


def test_delete_is_refused_while_a_queued_job_uses_the_file(client, alice):
    dataset = upload(client, chat_lines(5))
    job = FineTuningJob.objects.create(owner=alice, base_model="tiny-random-smollm2", training_file=dataset,
                                       training_file_ref=dataset.public_id, status=FineTuningJob.QUEUED)
    response = client.post(f"/datasets/{dataset.public_id}/delete/", follow=True)
    assert f"used by job {job.public_id}" in response.content.decode()
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.SUCCEEDED)
    client.post(f"/datasets/{dataset.public_id}/delete/")
    assert not Dataset.objects.filter(pk=dataset.pk).exists()


def test_bob_cannot_open_alices_dataset(client, alice):
    dataset = upload(client, chat_lines(5))
    bob = get_user_model().objects.create_user("bob", password="pw-bob-123")
    client.force_login(bob)
    assert client.get(f"/datasets/{dataset.public_id}/").status_code == 404
    assert client.get(f"/datasets/{dataset.public_id}/preview/").status_code == 404
