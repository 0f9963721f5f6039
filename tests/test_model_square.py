"""Model Square: the cards, downloads (PEFT zip, merged model) and delete cascading everywhere."""

import asyncio
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile

from datasets_app.models import Dataset
from deployments_app.catalog import exports, services
from deployments_app.deployments import services as deployment_services
from deployments_app.models import Deployment, ModelCard
from finetune_site.errors import NotAllowed
from jobs_app.models import Checkpoint, FineTuningJob, JobEvent

from .live import chat_lines

pytestmark = pytest.mark.django_db
BASE = "tiny-random-smollm2"


@pytest.fixture(autouse=True)
def folders(settings, tmp_path, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FT_ARTIFACTS_DIR = tmp_path / "artifacts"


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


def make_adapter(base_dir: Path, dest: Path) -> Path:
    """A real PEFT LoRA adapter for the tiny model, with non-zero weights so merging changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(dest)
    return dest


@pytest.fixture
def card(alice, tmp_path, tiny_model_dir):
    dataset = Dataset.objects.create(
        owner=alice, filename="train.jsonl", bytes=100, status=Dataset.PROCESSED, examples=6
    )
    dataset.file.save("train.jsonl", ContentFile(chat_lines(6)), save=False)
    dataset.normalized.save("train.jsonl", ContentFile(chat_lines(6)), save=True)
    job = FineTuningJob.objects.create(
        owner=alice,
        base_model=BASE,
        training_file=dataset,
        training_file_ref=dataset.public_id,
        status="succeeded",
        suffix="sq",
        resolved={"n_epochs": 2, "lora_rank": 4},
    )
    for step, loss in enumerate([2.0, 1.5, 1.2], start=1):
        JobEvent.objects.create(job=job, type=JobEvent.METRICS, step=step, data={"step": step, "train_loss": loss})
    folder = make_adapter(tiny_model_dir, tmp_path / "run" / "adapter")
    return ModelCard.objects.create(
        model_id=job.fine_tuned_model_id,
        owner=alice,
        job=job,
        base_model=BASE,
        method="lora",
        path=str(folder),
        hyperparameters=job.resolved,
        size_bytes=1234,
        metrics={"final_train_loss": 1.2, "eval_loss": 1.3},
    )


def body_of(response) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return asyncio.run(collect())


def test_model_square_shows_a_card_per_model_with_curve_and_buttons(client, card):
    page = client.get("/models/").content.decode()
    assert page.count('data-testid="model-card"') == 3  # two base models and the fine-tuned one
    assert (
        card.model_id in page and "train.jsonl" in page and "epochs 2 · " in page and "validation loss 1.3000" in page
    )
    assert 'data-testid="loss-thumbnail"' in page and f'id="loss-{card.pk}"' in page
    assert f"/jobs/new/?model={card.model_id.replace(':', '%3A')}" in page
    assert "Download adapter" in page and "Build merged model" in page and "Deploy" in page


def test_the_adapter_download_is_a_peft_zip_with_a_model_card(client, card):
    response = client.get(f"/models/{card.model_id}/download/adapter.zip")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(body_of(response)))
    names = {Path(n).name for n in archive.namelist()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    readme = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("README.md"))
    assert f"base_model: {BASE}" in readme and card.model_id in readme
    config = json.loads(next(archive.read(n) for n in archive.namelist() if n.endswith("adapter_config.json")))
    assert config["r"] == 4


def test_the_zip_is_streamed_in_pieces_not_built_in_memory(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * (3 * 1024 * 1024 + 7))
    pieces = list(exports.zip_chunks(tmp_path, prefix="m"))
    assert max(len(p) for p in pieces) <= 1024 * 1024 + 4096
    assert zipfile.ZipFile(io.BytesIO(b"".join(pieces))).read("m/big.bin") == b"x" * (3 * 1024 * 1024 + 7)


def test_the_merged_model_loads_with_transformers_and_matches_the_adapter(
    client, card, tiny_model_dir, tmp_path, django_capture_on_commit_callbacks, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr("deployments_app.tasks.build_merged_model.delay", lambda pk: services.model_merge(card_id=pk))
    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/models/{card.model_id}/merge/")
    response = client.get(f"/models/{card.model_id}/download/merged.zip")
    assert response.status_code == 200
    zipfile.ZipFile(io.BytesIO(body_of(response))).extractall(tmp_path / "unzipped")
    folder = next((tmp_path / "unzipped").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}

    merged = AutoModelForCausalLM.from_pretrained(str(folder))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), card.path)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = AutoTokenizer.from_pretrained(str(folder))("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got, base = with_adapter(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter must change the model"


def test_two_builds_of_one_merged_model_at_once_both_finish_and_leave_one_whole_model(card, monkeypatch):
    import threading

    from deployments_app.catalog import exports

    # Both builds have saved their weights before either writes its README and moves into place.
    both_saved = threading.Barrier(2, timeout=60)
    real_readme = exports.model_readme

    def readme(*args, **kwargs):
        both_saved.wait()
        return real_readme(*args, **kwargs)

    monkeypatch.setattr(exports, "model_readme", readme)
    folder, errors = services.export_dir(card), []

    def build():
        try:
            exports.build_merged_model(card, folder)
        except Exception as error:  # noqa: BLE001 - collected and asserted on
            errors.append(repr(error))

    builds = [threading.Thread(target=build) for _ in range(2)]
    for thread in builds:
        thread.start()
    for thread in builds:
        thread.join(timeout=120)

    assert errors == []
    assert sorted(path.name for path in folder.iterdir()) == ["merged"]  # no half-built folder, no marker
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (folder / "merged").iterdir()}
    assert exports.merged_state(folder) == "ready"


def test_the_merged_download_waits_until_it_is_built(client, card):
    assert client.get(f"/models/{card.model_id}/download/merged.zip").status_code == 302


def test_a_merge_abandoned_by_a_dead_worker_can_be_asked_for_again(
    card, django_capture_on_commit_callbacks, monkeypatch
):
    import os
    import time

    from deployments_app.catalog.exports import MERGE_STALE_SECONDS, merged_state

    queued = []
    monkeypatch.setattr("deployments_app.tasks.build_merged_model.delay", lambda pk: queued.append(pk))
    with django_capture_on_commit_callbacks(execute=True):
        assert services.model_merge_request(card=card) == "building"
        assert services.model_merge_request(card=card) == "building"  # asked twice, built once
    assert queued == [card.pk]
    partial = services.export_dir(card) / "merged.partial"
    long_ago = time.time() - MERGE_STALE_SECONDS - 60
    os.utime(partial, (long_ago, long_ago))  # the worker died mid-build: nothing touched it since
    assert merged_state(services.export_dir(card)) == "absent"
    with django_capture_on_commit_callbacks(execute=True):
        assert services.model_merge_request(card=card) == "building"
    assert queued == [card.pk, card.pk]


def test_delete_cancels_deployments_removes_files_and_the_id_is_404_everywhere(
    client, alice, card, django_capture_on_commit_callbacks, monkeypatch
):
    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: None)
    deployment = deployment_services.deployment_create(user=alice, model_id=card.model_id, instances=1)
    folder = Path(card.path)
    # A checkpoint where the engine writes them, usable as a model of its own until the model is deleted.
    checkpoint_dir = card.job.output_dir / "checkpoints" / "step-2"
    shutil.copytree(folder, checkpoint_dir / "adapter")
    checkpoint = Checkpoint.objects.create(job=card.job, step=2, path=str(checkpoint_dir))
    checkpoint_deployment = deployment_services.deployment_create(user=alice, model_id=checkpoint.model_id, instances=1)
    assert chat(client, checkpoint.model_id).status_code == 200
    assert client.get(f"/v1/models/{card.model_id}").status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/models/{card.model_id}/delete/")
    assert response.status_code == 302
    assert Deployment.objects.get(pk=deployment.pk).status == "cancelled"
    assert Deployment.objects.get(pk=checkpoint_deployment.pk).status == "cancelled"
    assert not folder.exists() and not checkpoint_dir.exists() and not Checkpoint.objects.filter(job=card.job).exists()
    assert client.get(f"/v1/models/{card.model_id}").status_code == 404
    assert client.delete(f"/v1/models/{card.model_id}").status_code == 404
    for model_id in (card.model_id, checkpoint.model_id):
        answer = chat(client, model_id)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
        assert client.post("/api/deployments", {"model": model_id}, content_type="application/json").status_code == 400
    assert client.get(f"/v1/models/{checkpoint.model_id}").status_code == 404
    assert checkpoint.model_id not in client.get("/playground/").content.decode()
    assert client.get(f"/models/{card.model_id}/download/adapter.zip").status_code == 404


def test_a_job_deleted_before_its_model_leaves_no_files_behind(
    client, alice, card, settings, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    from jobs_app.services import job_delete

    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: None)
    settings.FT_ARTIFACTS_DIR = tmp_path / "artifacts"
    run = card.job.output_dir
    shutil.copytree(card.path, run / "adapter")
    ModelCard.objects.filter(pk=card.pk).update(path=str(run / "adapter"))
    shutil.copytree(card.path, run / "checkpoints" / "step-2" / "adapter")
    (run / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"0" * 1000)
    (run / "metrics.jsonl").write_text("{}\n")
    checkpoint = Checkpoint.objects.create(job=card.job, step=2, path=str(run / "checkpoints" / "step-2"))
    on_checkpoint = deployment_services.deployment_create(user=alice, model_id=checkpoint.model_id, instances=1)
    on_model = deployment_services.deployment_create(user=alice, model_id=card.model_id, instances=1)
    with django_capture_on_commit_callbacks(execute=True):
        job_delete(job=card.job)
    assert not (run / "checkpoints").exists() and (run / "adapter" / "adapter_config.json").exists()
    # The checkpoint's deployment stops before its files go; the model's keeps serving.
    assert Deployment.objects.get(pk=on_checkpoint.pk).status == "cancelled"
    assert Deployment.objects.get(pk=on_model.pk).is_active
    assert client.get(f"/v1/models/{card.model_id}").status_code == 200  # the model stays usable
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/models/{card.model_id}/delete/").status_code == 302
    assert not run.exists()


def chat(client, model_id):
    return client.post(
        "/v1/chat/completions",
        {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        content_type="application/json",
    )


def test_deleting_a_base_model_is_refused_by_the_service_and_both_the_api_and_the_page_say_why(client, alice):
    reason = f"{BASE} is a base model and cannot be deleted."
    with pytest.raises(NotAllowed) as caught:
        services.model_delete(user=alice, model_id=BASE)
    # The service says why, with no HTTP in it; the status is the API's business.
    assert (caught.value.message, caught.value.param, caught.value.code) == (reason, "model", None)
    assert not hasattr(caught.value, "status_code")

    response = client.delete(f"/v1/models/{BASE}")
    assert response.status_code == 403
    assert response.json() == {"error": {"message": reason, "type": "permission_error", "param": "model", "code": None}}

    page = client.post(f"/models/{BASE}/delete/", HTTP_REFERER="http://testserver/models/", follow=True)
    assert page.redirect_chain == [("http://testserver/models/", 302)]
    assert page.status_code == 200 and reason in page.content.decode()
    assert client.get(f"/v1/models/{BASE}").status_code == 200  # still there

    # Posted without a Referer, the refusal goes back to Model Square, where the button was.
    bare = client.post(f"/models/{BASE}/delete/")
    assert bare.status_code == 302 and bare.url == "/models/"


def test_deleting_a_model_that_is_not_yours_is_a_404_page_not_a_redirect(client, alice):
    response = client.post("/models/ft:tiny-random-smollm2:nobody:x/delete/")
    assert response.status_code == 404 and "does not exist or you do not have access" in response.content.decode()
