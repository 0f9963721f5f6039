"""DPO jobs without a worker: the objective follows the data, the form, the engine config, metrics, the card."""

import csv
import io
import json

import pytest
from django.core.files.base import ContentFile

from datasets_app import services as dataset_services
from datasets_app.models import Dataset
from deployments_app.catalog import services as catalog_services
from deployments_app.models import ModelCard
from finetune_site.errors import InvalidInput, InvalidState
from jobs_app import services, transitions
from jobs_app.models import Checkpoint, FineTuningJob
from jobs_app.sink import JobSink

from .test_api_auth import make_dataset
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db


def preference_lines(n: int) -> bytes:
    """n preference pairs that a model can learn to tell apart: a polite answer over a curt one."""
    lines = []
    for i in range(n):
        pair = {
            "input": {"messages": [{"role": "user", "content": f"Is parcel {i} ready?"}]},
            "preferred_output": [{"role": "assistant", "content": f"Yes, parcel {i} is ready. Thank you!"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        lines.append(json.dumps(pair))
    return ("\n".join(lines) + "\n").encode()


def pairs_dataset(owner, **fields) -> Dataset:
    """A dataset the validator found to hold preference pairs (no file behind it that training could read)."""
    return make_dataset(owner, format="preference", examples=40, **fields)


def chat_dataset(owner, **fields) -> Dataset:
    return make_dataset(owner, format="chat", examples=40, **fields)


def image_dataset(owner) -> Dataset:
    return make_dataset(owner, format="image", examples=40, report={"stats": {"images": 40}})


def validated_pairs(owner, n: int = 16) -> Dataset:
    """A real preference file, validated as an upload is."""
    dataset = Dataset(owner=owner, filename="pairs.jsonl", bytes=0)
    dataset.file.save("pairs.jsonl", ContentFile(preference_lines(n)), save=False)
    dataset.bytes = dataset.file.size
    dataset.save()
    dataset_services.dataset_validate(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.PROCESSED and dataset.format == "preference", dataset.status_details
    return dataset


def make_card(owner, tmp_path, *, method: str = "lora", objective: str = "sft", **job_fields) -> ModelCard:
    """A finished fine-tune of the tiny model with a weights folder the engine would accept as init_from."""
    dataset = chat_dataset(owner)
    job = FineTuningJob.objects.create(
        owner=owner,
        base_model=BASE,
        training_file=dataset,
        training_file_ref=dataset.public_id,
        status="succeeded",
        method=method,
        objective=objective,
        **job_fields,
    )
    folder = tmp_path / job.public_id / ("model" if method == "full" else "adapter")
    folder.mkdir(parents=True)
    (folder / ("config.json" if method == "full" else "adapter_config.json")).write_text("{}")
    return ModelCard.objects.create(
        model_id=job.fine_tuned_model_id,
        owner=owner,
        job=job,
        base_model=BASE,
        method=method,
        objective=objective,
        path=str(folder),
        hyperparameters=job.resolved,
    )


def test_a_preference_file_trains_dpo_with_beta_and_a_chat_file_trains_sft_without(alice):
    dpo = services.job_create(owner=alice, model=BASE, training_file=pairs_dataset(alice).public_id)
    sft = services.job_create(owner=alice, model=BASE, training_file=chat_dataset(alice).public_id)
    assert dpo.objective == "dpo" and dpo.resolved["beta"] == 0.1
    assert sft.objective == "sft" and "beta" not in sft.resolved
    asked = services.job_create(
        owner=alice,
        model=BASE,
        training_file=pairs_dataset(alice).public_id,
        objective="dpo",
        hyperparameters={"beta": 0.5},
    )
    assert asked.resolved["beta"] == 0.5


@pytest.mark.parametrize(
    "make, objective, words",
    [
        (pairs_dataset, "sft", "holds preference pairs, which train with method dpo"),
        (chat_dataset, "dpo", "holds chat examples, which train with method supervised"),
        (image_dataset, None, "vision training is not supported yet"),
        (
            lambda owner: pairs_dataset(owner, report={"stats": {"images": 3}}),
            "dpo",
            "vision training is not supported yet",
        ),
    ],
)
def test_a_file_of_another_kind_is_refused_at_creation_and_no_job_is_queued(alice, make, objective, words):
    dataset = make(alice)
    with pytest.raises(InvalidInput) as refused:
        services.job_create(owner=alice, model=BASE, training_file=dataset.public_id, objective=objective)
    assert words in refused.value.message and dataset.public_id in refused.value.message
    assert refused.value.param == "training_file"
    assert not FineTuningJob.objects.exists()


def test_build_train_config_passes_the_objective_beta_and_the_model_it_starts_from(alice, tmp_path):
    card = make_card(alice, tmp_path)
    job = services.job_create(
        owner=alice, model=card.model_id, training_file=pairs_dataset(alice).public_id, hyperparameters={"beta": 0.2}
    )
    assert (job.base_model, job.init_model, job.method) == (BASE, card.model_id, "lora")
    config = services.build_train_config(job, resume_from=None)
    assert (config.objective, config.dpo_beta, config.init_from) == ("dpo", 0.2, card.path)
    assert config.model.endswith(BASE)
    sft = services.build_train_config(
        services.job_create(owner=alice, model=BASE, training_file=chat_dataset(alice).public_id), resume_from=None
    )
    assert (sft.objective, sft.init_from) == ("sft", None)


def test_a_full_fine_tune_continues_only_as_full_and_an_adapter_only_as_its_method(alice, tmp_path):
    full = make_card(alice, tmp_path, method="full")
    pairs = pairs_dataset(alice).public_id
    with pytest.raises(InvalidInput) as refused:
        services.job_create(owner=alice, model=full.model_id, training_file=pairs, method="lora")
    assert "full fine-tune" in refused.value.message and "training_type full" in refused.value.message
    assert f"start from its base model {BASE}" in refused.value.message
    job = services.job_create(owner=alice, model=full.model_id, training_file=pairs)
    assert job.method == "full" and services.build_train_config(job, resume_from=None).init_from == full.path

    dora = make_card(alice, tmp_path, method="dora")
    with pytest.raises(InvalidInput, match="is a dora adapter: a job starting from it trains with training_type dora"):
        services.job_create(owner=alice, model=dora.model_id, training_file=pairs, method="lora")


def test_a_model_deleted_before_its_job_starts_fails_the_run_saying_so(alice, tmp_path):
    from llm.train import ConfigError

    card = make_card(alice, tmp_path)
    job = services.job_create(owner=alice, model=card.model_id, training_file=pairs_dataset(alice).public_id)
    ModelCard.objects.filter(pk=card.pk).delete()
    with pytest.raises(ConfigError, match=f"the model {card.model_id} this job starts from was deleted"):
        services.build_train_config(job, resume_from=None)


def test_a_model_a_job_trains_on_from_cannot_be_deleted_until_the_job_ends(alice, tmp_path):
    card = make_card(alice, tmp_path)
    job = services.job_create(owner=alice, model=card.model_id, training_file=pairs_dataset(alice).public_id)
    with pytest.raises(InvalidState, match=f"Job {job.public_id} .* trains on from {card.model_id}"):
        catalog_services.model_card_delete(card=card)
    FineTuningJob.objects.filter(pk=job.pk).update(status="cancelled")
    catalog_services.model_card_delete(card=card)
    assert not ModelCard.objects.filter(pk=card.pk).exists()


def test_holding_out_validation_pairs_splits_a_preference_file_into_two_preference_files(alice, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    monkeypatch.setattr("datasets_app.tasks.compute_statistics.delay", lambda pk: None)
    dataset = validated_pairs(alice, n=16)
    job = services.job_create(owner=alice, model=BASE, training_file=dataset.public_id, holdout_percent=25)
    services.job_prepare_holdout(job_id=job.pk, percent=25)
    job.refresh_from_db()
    assert job.status == "queued", job.error
    assert (job.training_file.format, job.validation_file.format) == ("preference", "preference")
    assert (job.training_file.examples, job.validation_file.examples) == (12, 4)
    assert job.objective == "dpo" and "beta" in job.resolved


# --- The create form ---------------------------------------------------------------


def test_the_form_offers_dpo_and_beta_for_a_preference_file_and_sft_without_beta_for_chat(client, alice):
    pairs, chat = pairs_dataset(alice), chat_dataset(alice)
    page = client.get(f"/jobs/new/?training_file={pairs.public_id}").content.decode()
    assert '<option value="dpo" selected>' in page
    assert 'data-objectives="dpo">' in page  # the beta field, shown
    assert "preference pairs" in page and f'"{pairs.public_id}": "dpo"' in page  # for the page script
    page = client.get(f"/jobs/new/?training_file={chat.public_id}").content.decode()
    assert '<option value="sft" selected>' in page
    assert 'data-objectives="dpo" hidden>' in page and 'name="beta"' in page


def test_the_form_refuses_a_mismatch_naming_the_files_kind(client, alice, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    pairs = pairs_dataset(alice)
    form = {"model": BASE, "training_file": pairs.public_id, "method": "lora", "objective": "sft"}
    page = client.post("/jobs/new/", form).content.decode()
    assert "holds preference pairs, which train with method dpo" in page and not FineTuningJob.objects.exists()
    response = client.post("/jobs/new/", {**form, "objective": "dpo", "beta": "0.3"})
    job = FineTuningJob.objects.get()
    assert response.status_code == 302 and job.objective == "dpo" and job.resolved["beta"] == 0.3


def test_the_estimate_names_the_objective_and_beta_and_refuses_images(client, alice):
    pairs = pairs_dataset(alice, report={"tokens": {"billable_tokens": 3000}})
    page = client.post("/jobs/estimate/", {"model": BASE, "training_file": pairs.public_id}).content.decode()
    assert "Preference (DPO), beta 0.1" in page and "3,000 per epoch" in page
    images = image_dataset(alice)
    page = client.post("/jobs/estimate/", {"model": BASE, "training_file": images.public_id}).content.decode()
    assert "vision training is not supported yet" in page.lower()


# --- Metrics: the sink, the job page, the CSV ---------------------------------------


def dpo_metric(step: int, *, margin: float = 0.5, accuracy: float = 0.75) -> dict:
    return {
        "step": step,
        "total_steps": 10,
        "epoch": 1,
        "loss": 0.6,
        "lr": 1e-4,
        "grad_norm": 0.3,
        "tokens": 100 * step,
        "tokens_per_second": 900.0,
        "elapsed_s": 1.0,
        "eta_s": 5.0,
        "rewards_chosen": 0.2,
        "rewards_rejected": -0.3,
        "reward_margin": margin,
        "reward_accuracy": accuracy,
        "logps_chosen": -12.5,
        "logps_rejected": -20.25,
    }


def dpo_eval(step: int, *, margin: float = 0.4) -> dict:
    return {
        "step": step,
        "eval_loss": 0.65,
        "eval_rewards_chosen": 0.1,
        "eval_rewards_rejected": -0.2,
        "eval_reward_margin": margin,
        "eval_reward_accuracy": 0.625,
        "eval_logps_chosen": -13.0,
        "eval_logps_rejected": -19.0,
    }


def dpo_job(owner) -> FineTuningJob:
    """A DPO job a worker has claimed: its sink writes only while the run holds it."""
    job = services.job_create(owner=owner, model=BASE, training_file=pairs_dataset(owner).public_id)
    assert transitions.start(job, worker="test-worker")
    return job


def test_dpo_points_carry_rewards_and_log_probabilities_and_the_csv_has_their_columns(client, alice):
    job = dpo_job(alice)
    sink = JobSink(job)
    sink("metric", dpo_metric(1))
    sink("eval", dpo_eval(1))
    sink.flush()
    train, valid = (e.data for e in job.events.filter(type="metrics").order_by("id"))
    assert train["train_reward_accuracy"] == 0.75 and train["train_logps_rejected"] == -20.25
    assert train["train_loss"] == 0.6 and train["train_mean_token_accuracy"] is None
    assert valid["valid_reward_margin"] == 0.4 and valid["valid_rewards_chosen"] == 0.1

    rows = list(csv.DictReader(io.StringIO(client.get(f"/jobs/{job.public_id}/metrics.csv").content.decode())))
    assert {
        "train_loss",
        "valid_loss",
        "train_reward_accuracy",
        "valid_reward_accuracy",
        "train_reward_margin",
        "valid_reward_margin",
        "train_rewards_chosen",
        "train_rewards_rejected",
        "valid_logps_chosen",
        "valid_logps_rejected",
    } <= set(rows[0])
    assert rows[0]["train_reward_accuracy"] == "0.75" and rows[1]["valid_reward_accuracy"] == "0.625"


def test_the_job_page_draws_dpo_charts_and_an_sft_page_keeps_token_accuracy(client, alice):
    job = dpo_job(alice)
    sink = JobSink(job)
    sink("metric", dpo_metric(1))
    sink("eval", dpo_eval(1))
    sink.flush()
    response = client.get(f"/jobs/{job.public_id}/")
    page = response.content.decode()
    for chart in ("reward_accuracy", "reward_margin", "rewards", "logps"):
        assert f'id="chart-{chart}"' in page
    assert 'id="chart-accuracy"' not in page and "Preference (DPO)" in page and "DPO beta" in page
    figures = response.context["figures"]
    accuracy = {trace["name"]: trace["y"] for trace in figures["reward_accuracy"]["data"]}
    assert accuracy == {"train reward accuracy": [0.75], "validation reward accuracy": [0.625]}
    assert [t["meta"]["key"] for t in figures["logps"]["data"]] == [
        "train_logps_chosen",
        "train_logps_rejected",
        "valid_logps_chosen",
        "valid_logps_rejected",
    ]
    sft = services.job_create(owner=alice, model=BASE, training_file=chat_dataset(alice).public_id)
    page = client.get(f"/jobs/{sft.public_id}/").content.decode()
    assert 'id="chart-accuracy"' in page and 'id="chart-reward_accuracy"' not in page


def test_the_overfitting_warning_watches_the_validation_reward_margin_of_a_dpo_run(alice):
    job = dpo_job(alice)
    sink = JobSink(job)
    # The validation loss stays flat; the validation margin falls while the training margin rises.
    for step, (train_margin, valid_margin) in enumerate([(0.1, 0.5), (0.5, 0.4), (1.0, 0.3), (2.0, 0.2)], start=1):
        sink("metric", dpo_metric(step, margin=train_margin))
        sink("eval", dpo_eval(step, margin=valid_margin))
    sink.flush()
    warnings = list(job.events.filter(level="warn"))
    assert len(warnings) == 1
    assert "validation reward margin fell from 0.5000 to 0.3000" in warnings[0].message
    assert "training reward margin rose" in warnings[0].message


def test_no_overfitting_warning_while_the_validation_margin_keeps_rising(alice):
    job = dpo_job(alice)
    sink = JobSink(job)
    for step, margin in enumerate([0.1, 0.2, 0.3, 0.4], start=1):
        sink("metric", dpo_metric(step, margin=margin * 2))
        # A rising validation loss alone is not the DPO warning: the margin says the preference generalises.
        sink("eval", {**dpo_eval(step, margin=margin), "eval_loss": 0.5 + step})
    sink.flush()
    assert not job.events.filter(level="warn").exists()


# --- The model card -----------------------------------------------------------------


def test_a_dpo_model_card_names_the_objective_beta_and_the_reward_accuracy(client, alice, tmp_path):
    job = services.job_create(
        owner=alice, model=BASE, training_file=pairs_dataset(alice).public_id, hyperparameters={"beta": 0.25}
    )
    (job.output_dir / "adapter").mkdir(parents=True)
    summary = {
        "final_train_loss": 0.4,
        "objective": "dpo",
        "dpo_beta": 0.25,
        "final_reward_accuracy": 0.875,
        "final_reward_margin": 1.5,
        "eval_reward_accuracy": 0.8125,
        "eval_reward_margin": 1.25,
    }
    card = catalog_services.model_card_create_from_job(job=job, summary=summary)
    assert card.objective == "dpo" and card.hyperparameters["beta"] == 0.25
    assert card.metrics["final_reward_accuracy"] == 0.875 and card.metrics["eval_reward_margin"] == 1.25
    page = client.get("/models/").content.decode()
    shown = page[page.index(f'data-model="{card.model_id}"') :]
    assert "Preference (DPO)" in shown and "beta 0.25" in shown
    assert "reward accuracy 0.8750" in shown and "validation reward accuracy 0.8125" in shown


def test_a_dpo_checkpoint_reports_its_reward_accuracy_and_margin(client, alice):
    from finetune_site.models import ApiKey

    job = dpo_job(alice)
    Checkpoint.objects.create(
        job=job,
        step=4,
        path="/nowhere",
        metrics={"train_loss": 0.5, "train_reward_accuracy": 0.75, "valid_reward_margin": 0.3},
    )
    key = ApiKey.issue(alice, name="test")[1]
    listed = client.get(f"/v1/fine_tuning/jobs/{job.public_id}/checkpoints", HTTP_AUTHORIZATION=f"Bearer {key}")
    metrics = listed.json()["data"][0]["metrics"]
    assert metrics["train_reward_accuracy"] == 0.75 and metrics["valid_reward_margin"] == 0.3
    assert metrics["train_loss"] == 0.5 and metrics["train_mean_token_accuracy"] is None


def test_a_checkpoint_the_engine_removed_stops_being_listed(alice, tmp_path):
    job = dpo_job(alice)
    sink = JobSink(job)
    for step in (4, 8):
        sink("checkpoint", {"step": step, "path": str(tmp_path / f"step-{step}"), "metrics": {"train_loss": 0.5}})
    sink("checkpoint_removed", {"step": 4, "path": str(tmp_path / "step-4")})
    assert list(job.checkpoints.values_list("step", flat=True)) == [8]


def test_the_playground_samples_a_dpo_models_prompts_with_the_preferred_answer_as_reference(client, alice, tmp_path):
    card = make_card(alice, tmp_path, objective="dpo")
    card.job.training_file = validated_pairs(alice, n=4)
    card.job.save()

    body = client.get("/playground/sample/", {"model": card.model_id}).json()

    number = body["prompt"].removeprefix("Is parcel ").removesuffix(" ready?")
    assert body["reference"] == f"Yes, parcel {number} is ready. Thank you!"
