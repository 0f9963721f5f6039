"""Datasets in the app: upload, background validation, token statistics, preview, split, dedupe, delete."""

import json
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services, validation
from datasets_app.models import Dataset
from jobs_app.models import FineTuningJob

from .datasets.support import data_url, jsonl, png_bytes
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


@pytest.fixture
def eager_tasks():
    """Celery runs each task in the caller, as soon as it is sent (the worker's code, without the worker)."""
    from finetune_site.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


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


def test_the_upload_script_is_told_where_to_go_and_the_message_waits_there(client, alice, settings):
    settings.FT_MAX_UPLOAD_BYTES = 100
    response = client.post(
        "/datasets/upload/",
        {"file": SimpleUploadedFile("big.jsonl", chat_lines(10))},
        headers={"X-Upload-Progress": "1"},
    )
    assert response.status_code == 200 and response.json() == {"location": "/datasets/"}
    assert "over the limit of 100 bytes" in client.get("/datasets/").content.decode()


def test_token_statistics_are_stored_and_shown(client, alice):
    dataset = upload(client, chat_lines(12))
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    tokens = dataset.report["tokens"]
    assert tokens["examples"] == 12 and 0 < tokens["trained_tokens"] < tokens["total_tokens"]
    page = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    assert "Trained (assistant) tokens" in page and 'data-figure="token-histogram"' in page


def test_the_page_lists_which_lines_are_too_long(client, alice):
    long_answer = {
        "messages": [
            {"role": "user", "content": "Tell me a story"},
            {"role": "assistant", "content": "Once upon a time " * 60},
        ]
    }
    content = chat_lines(2) + b"\n" + json.dumps(long_answer).encode() + b"\n"  # line 3 is blank
    dataset = upload(client, content)
    services.dataset_compute_statistics(dataset_id=dataset.pk, max_seq_len=128)
    page = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    listed = page.split('data-testid="too-long-lines"', 1)[1].split("</details>", 1)[0]
    assert "line 4: the example is" in listed and "longer than the maximum sequence length 128" in listed
    assert "line 1:" not in listed and "line 2:" not in listed


def test_a_preview_page_past_the_end_shows_the_last_page(client, alice):
    dataset = upload(client, chat_lines(3))
    for page in ("10", str(10**18), "9" * 5000, "-4", "x"):
        response = client.get(f"/datasets/{dataset.public_id}/preview/?page={page}")
        assert response.status_code == 200 and "code for item 2?" in response.content.decode(), page


def test_the_preview_highlights_trained_tokens_and_shows_conversions(client, alice):
    alpaca = b"\n".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}!"}).encode() for i in range(3)) + b"\n"
    dataset = upload(client, alpaca, name="alpaca.jsonl")
    page = client.get(f"/datasets/{dataset.public_id}/preview/").content.decode()
    assert "converted from alpaca" in page
    assert '<mark class="trained">0!' in page


def image_examples() -> bytes:
    """A GLM-4V question about an inline and a web image, and a CogView drawing answered with an image."""
    question = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(2, 2))}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "Which of these is a cat?"},
                ],
            },
            {"role": "assistant", "content": "The second one."},
        ]
    }
    drawing = {
        "messages": [
            {"role": "user", "content": "Draw a red square."},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(4, 4))}}]},
        ]
    }
    return jsonl(question, drawing)


def test_image_datasets_get_token_statistics(client, alice):
    dataset = upload(client, image_examples())
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()

    tokens = dataset.report["tokens"]
    assert "error" not in tokens
    assert (tokens["examples"], tokens["images"], tokens["image_tokens"]) == (2, 3, 3 * 1024)
    assert tokens["trained_tokens"] > 1024  # the drawn image is an answer, so it is trained on


def test_the_preview_shows_image_examples_without_loading_web_images(client, alice):
    dataset = upload(client, image_examples())
    response = client.get(f"/datasets/{dataset.public_id}/preview/")

    assert response.status_code == 200
    page = response.content.decode()
    assert f'<img src="{data_url(png_bytes(2, 2))}"' in page and f'<img src="{data_url(png_bytes(4, 4))}"' in page
    assert '<img src="https://' not in page
    assert 'href="https://example.com/cat.jpg"' in page and "[image] https://example.com/cat.jpg" in page
    assert "Which of these is a cat?" in page and '<mark class="trained">The second one.' in page
    assert "plus 2 images, 1,024 tokens each" in page and "plus 1 image, 1,024 tokens each" in page


def test_the_preview_names_an_example_it_cannot_render(client, alice, monkeypatch):
    from llm.chat import ChatFormat, ChatFormatError

    def refuse(*args, **kwargs):
        raise ChatFormatError("Conversation roles must alternate")

    dataset = upload(client, chat_lines(2))
    monkeypatch.setattr(ChatFormat, "render", refuse)
    response = client.get(f"/datasets/{dataset.public_id}/preview/")

    assert response.status_code == 200
    assert (
        "The trained tokens cannot be shown for this example: Conversation roles must alternate"
        in response.content.decode()
    )


def test_the_preview_shows_both_answers_of_a_preference_pair(client, alice):
    pair = {
        "input": {"messages": [{"role": "user", "content": "Is the sky blue?"}]},
        "preferred_output": [{"role": "assistant", "content": "Yes, on a clear day."}],
        "non_preferred_output": [{"role": "assistant", "content": "Who cares."}],
    }
    dataset = upload(client, jsonl(pair))
    page = client.get(f"/datasets/{dataset.public_id}/preview/").content.decode()

    question, preferred, rejected = (
        page.index(text) for text in ("Is the sky blue?", "Preferred answer", "Non-preferred answer")
    )
    assert question < preferred < page.index("Yes, on a clear day.") < rejected < page.index("Who cares.")
    assert '<mark class="trained">Yes, on a clear day.' in page and '<mark class="trained">Who cares.' in page


def test_a_bom_before_a_blank_first_line_keeps_the_preview_working(client, alice):
    dataset = upload(client, b"\xef\xbb\xbf\n" + chat_lines(3))
    assert dataset.status == Dataset.PROCESSED
    response = client.get(f"/datasets/{dataset.public_id}/preview/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "Example 3" in page and "What is the code for item 2?" in page


def test_statistics_without_a_ready_base_model_say_so_and_stop_polling(client, alice, settings, tmp_path):
    dataset = upload(client, chat_lines(3))
    settings.FT_MODELS_DIR = tmp_path / "no-models"
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()

    assert dataset.report["tokens"] == {"error": services.NO_TOKENIZER}
    page = client.get(f"/datasets/{dataset.public_id}/?part=tokens", HTTP_HX_REQUEST="true").content.decode()
    assert "No base model is ready" in page and "every 2s" not in page


def test_statistics_that_crash_are_stored_logged_and_shown(client, alice, monkeypatch, caplog):

    def crash(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    dataset = upload(client, chat_lines(3))
    monkeypatch.setattr(services, "token_statistics", crash)
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()

    assert dataset.report["tokens"] == {"error": "Counting tokens failed: RuntimeError: tokenizer exploded"}
    assert "token statistics of " + dataset.public_id + " failed" in caplog.text
    page = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    assert "Counting tokens failed: RuntimeError: tokenizer exploded" in page and "?part=tokens" not in page


def test_the_cost_is_shown_only_with_a_price(client, alice, settings):
    dataset = upload(client, chat_lines(3))
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    free = client.get(f"/datasets/{dataset.public_id}/").content.decode()
    settings.FT_PRICE_PER_1K_TOKENS = 0.5
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    priced = client.get(f"/datasets/{dataset.public_id}/").content.decode()

    assert "set FT_PRICE_PER_1K_TOKENS to see a cost estimate" in free and "0.0000" not in free
    assert "(at 0.5 per 1K tokens)" in priced and "set FT_PRICE_PER_1K_TOKENS" not in priced


@pytest.mark.parametrize("valid", [True, False])
def test_a_dataset_deleted_while_validated_stays_deleted(client, alice, monkeypatch, settings, valid):
    content = chat_lines(3) if valid else b"not json\n"
    response = client.post("/datasets/upload/", {"file": SimpleUploadedFile("train.jsonl", content)})
    assert response.status_code == 302
    dataset = Dataset.objects.latest("id")
    read_lines = validation.validate_stream

    def deleted_meanwhile(source, **options):
        report = read_lines(source, **options)
        services.dataset_delete(dataset=Dataset.objects.get(pk=dataset.pk))
        return report

    monkeypatch.setattr(services, "validate_stream", deleted_meanwhile)
    assert services.dataset_validate(dataset_id=dataset.pk) is None
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
    assert list((Path(settings.MEDIA_ROOT) / "datasets" / "normalized").glob("*")) == []


def test_split_creates_new_datasets_and_keeps_the_original(
    client, alice, eager_tasks, django_capture_on_commit_callbacks
):
    dataset = upload(client, chat_lines(20))
    with django_capture_on_commit_callbacks(execute=True):  # the worker writes the parts once the rows are committed
        created = services.dataset_split(dataset=dataset, validation_percent=25, seed=1)
    for d in created:
        d.refresh_from_db()
    sizes = [len([line for line in d.file.open("rb") if line.strip()]) for d in created]
    assert sizes == [15, 5]
    assert [d.status for d in created] == [Dataset.PROCESSED] * 2
    assert Dataset.objects.filter(pk=dataset.pk).exists()


def test_dedupe_drops_exact_duplicates(client, alice, eager_tasks, django_capture_on_commit_callbacks):
    dataset = upload(client, chat_lines(5) + chat_lines(5))
    with django_capture_on_commit_callbacks(execute=True):
        copy = services.dataset_dedupe(dataset=dataset)
    copy.refresh_from_db()
    assert len([line for line in copy.file.open("rb") if line.strip()]) == 5


def test_delete_is_refused_while_a_queued_job_uses_the_file(client, alice):
    dataset = upload(client, chat_lines(5))
    job = FineTuningJob.objects.create(
        owner=alice,
        base_model="tiny-random-smollm2",
        training_file=dataset,
        training_file_ref=dataset.public_id,
        status=FineTuningJob.QUEUED,
    )
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


def test_a_refusal_is_one_domain_error_that_the_api_and_the_page_each_answer(client, alice):
    from finetune_site.errors import InvalidState

    dataset = upload(client, chat_lines(5))
    FineTuningJob.objects.create(
        owner=alice,
        base_model="tiny-random-smollm2",
        training_file=dataset,
        training_file_ref=dataset.public_id,
        status=FineTuningJob.RUNNING,
    )
    with pytest.raises(InvalidState) as refused:
        services.dataset_delete(dataset=dataset)
    assert not hasattr(refused.value, "status_code") and refused.value.code == "file_in_use"

    api = client.delete(f"/v1/files/{dataset.public_id}")
    assert api.status_code == 400
    assert api.json()["error"]["code"] == "file_in_use" and "cancel the job first" in api.json()["error"]["message"]

    page = client.post(
        f"/datasets/{dataset.public_id}/delete/", HTTP_REFERER=f"http://testserver/datasets/{dataset.public_id}/"
    )
    assert page.status_code == 302 and page.url == f"http://testserver/datasets/{dataset.public_id}/"
    assert "cancel the job first" in client.get(page.url).content.decode()


def test_split_settings_that_are_not_numbers_come_back_to_the_dataset_page(client, alice):
    dataset = upload(client, chat_lines(20))
    response = client.post(f"/datasets/{dataset.public_id}/split/", {"validation_percent": "ten"})
    assert response.status_code == 302 and response.url == f"/datasets/{dataset.public_id}/"
    assert "Invalid split settings" in client.get(response.url).content.decode()
    too_many = client.post(
        f"/datasets/{dataset.public_id}/split/", {"validation_percent": "60", "test_percent": "40"}, follow=True
    )
    assert "must stay below 100" in too_many.content.decode()


def test_counting_tokens_shows_how_far_it_got_and_the_progress_goes_when_done(client, alice, monkeypatch):
    dataset = upload(client, chat_lines(250))
    monkeypatch.setattr(services, "TOKENS_PROGRESS_SECONDS", 0)
    seen = []
    write_progress = services._progress_writer

    def progress_and_look(counting):
        write = write_progress(counting)

        def step(counted):
            write(counted)
            seen.append(client.get(f"/datasets/{dataset.public_id}/?part=tokens", HTTP_HX_REQUEST="true").content)

        return step

    monkeypatch.setattr(services, "_progress_writer", progress_and_look)
    services.dataset_compute_statistics(dataset_id=dataset.pk)
    dataset.refresh_from_db()

    assert b"100 of 250 examples (40%) so far" in seen[0] and b"200 of 250 examples (80%) so far" in seen[1]
    assert len(seen) == 2 and b"every 2s" in seen[0]
    assert "tokens_progress" not in dataset.report and dataset.report["tokens"]["examples"] == 250
