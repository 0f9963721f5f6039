"""DPO through the API: `method` in OpenAI's shape, refusals at creation, and a real DPO run end to end.

The openai SDK talks to the Django app in this process (WSGI), so these run without the live stack;
the end-to-end run trains the tiny model with the real engine in the test process.
"""

import csv
import io
from pathlib import Path

import httpx
import openai
import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from datasets_app.models import Dataset
from deployments_app.models import ModelCard
from finetune_site.models import ApiKey
from jobs_app import services
from jobs_app.models import Checkpoint, FineTuningJob

from . import test_dpo_jobs
from .test_api_auth import auth
from .test_dpo_jobs import BASE, chat_dataset, image_dataset, make_card, pairs_dataset, preference_lines

pytestmark = pytest.mark.django_db
alice, folders = test_dpo_jobs.alice, test_dpo_jobs.folders  # the same user and folders as the DPO job tests


@pytest.fixture
def alice_key(alice):
    return ApiKey.issue(alice, name="test")[1]


@pytest.fixture
def headers(alice_key):
    return auth(alice_key)


@pytest.fixture
def sdk(alice_key):
    """The official openai client, its requests served by this process's Django app."""
    # As Django's test client does: a request must not close the test's database connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    http = httpx.Client(transport=httpx.WSGITransport(app=WSGIHandler()), base_url="http://testserver")
    yield openai.OpenAI(base_url="http://testserver/v1", api_key=alice_key, http_client=http, max_retries=0)
    http.close()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def create(client, headers, prefix="/v1", **body):
    return client.post(
        f"{prefix}/fine_tuning/jobs", {"model": BASE, **body}, content_type="application/json", **headers
    )


def dpo_method(**hyperparameters):
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


# --- Refusals at creation, each naming the file's kind --------------------------------


def test_preference_pairs_with_method_supervised_are_refused_naming_the_kind(client, headers, alice):
    pairs = pairs_dataset(alice)
    response = create(client, headers, training_file=pairs.public_id, method={"type": "supervised"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "training_file"
    assert error["message"].startswith(f"File {pairs.public_id} holds preference pairs, which train with method dpo")
    assert not FineTuningJob.objects.exists()


def test_chat_examples_with_method_dpo_are_refused_naming_the_kind(client, headers, alice):
    chat = chat_dataset(alice)
    response = create(client, headers, training_file=chat.public_id, method=dpo_method(beta=0.2))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "training_file"
    assert f"File {chat.public_id} holds chat examples, which train with method supervised" in error["message"]
    assert "method dpo needs a file of preference pairs" in error["message"]


@pytest.mark.parametrize("method", [None, {"type": "supervised"}, dpo_method()])
def test_an_image_file_is_refused_at_creation_as_vision_training_is_not_supported_yet(client, headers, alice, method):
    images = image_dataset(alice)
    response = create(client, headers, training_file=images.public_id, **({"method": method} if method else {}))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "training_file"
    assert "holds examples with images; vision training is not supported yet" in error["message"]
    assert not FineTuningJob.objects.exists()


@pytest.mark.parametrize("train, valid, words", [(pairs_dataset, chat_dataset, "chat examples, but training file")])
def test_a_validation_file_of_another_kind_is_refused(client, headers, alice, train, valid, words):
    train_set, valid_set = train(alice), valid(alice)
    response = create(client, headers, training_file=train_set.public_id, validation_file=valid_set.public_id)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "validation_file"
    assert f"Validation file {valid_set.public_id} holds chat examples, but training file" in error["message"]
    assert f"{train_set.public_id} holds preference pairs: both must be of the same kind" in error["message"]
    images = image_dataset(alice)
    response = create(client, headers, training_file=train_set.public_id, validation_file=images.public_id)
    assert response.json()["error"]["param"] == "validation_file"
    assert "vision training is not supported yet" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}},
        {"hyperparameters": {"beta": 0.2}},  # zhipuai's shape: the chat file makes it supervised
    ],
)
def test_beta_on_a_supervised_job_is_refused(client, headers, alice, body):
    chat = chat_dataset(alice)
    response = create(client, headers, training_file=chat.public_id, **body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "hyperparameters.beta"
    assert error["message"].startswith("beta applies to method dpo only, and this job trains method supervised")
    assert f"file {chat.public_id} holds chat examples" in error["message"]


def test_an_unknown_method_type_is_refused_naming_method_type(client, headers, alice):
    response = create(client, headers, training_file=pairs_dataset(alice).public_id, method={"type": "reinforcement"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "method.type"
    assert "'reinforcement' is not supported" in error["message"] and '"dpo"' in error["message"]
    response = create(client, headers, training_file=pairs_dataset(alice).public_id, method={"type": "dpo", "dpo": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "method.dpo"


def test_a_bad_starting_model_is_refused_saying_what_works(client, headers, alice, tmp_path):
    pairs = pairs_dataset(alice).public_id
    full = make_card(alice, tmp_path, method="full")
    response = create(client, headers, model=full.model_id, training_file=pairs, training_type="lora")
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "training_type"
    assert f"Model {full.model_id} is a full fine-tune" in error["message"]
    assert "trains with training_type full, not lora" in error["message"]
    response = create(client, headers, model="ft:tiny-random-smollm2:alice::nothere1", training_file=pairs)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "model"
    assert "neither a base model here nor one of your fine-tuned models" in error["message"]
    assert FineTuningJob.objects.count() == 1  # the card's own job only


def test_another_users_fine_tuned_model_is_not_a_starting_point(client, alice, tmp_path):
    from django.contrib.auth import get_user_model

    bob = get_user_model().objects.create_user("bob", password="pw-bob-123")
    card = make_card(alice, tmp_path)
    response = create(
        client,
        auth(ApiKey.issue(bob, name="test")[1]),
        model=card.model_id,
        training_file=pairs_dataset(bob).public_id,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


# --- The job object: method echoed, zhipuai's path, the training file deciding -------------


def test_without_method_the_file_decides_and_the_job_echoes_both_shapes_under_both_paths(client, headers, alice):
    for prefix in ("/v1", "/api/paas/v4"):
        pairs = pairs_dataset(alice)
        job = create(client, headers, prefix, training_file=pairs.public_id, hyperparameters={"beta": 0.3}).json()
        assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.3
        assert job["hyperparameters"]["beta"] == 0.3 and "supervised" not in job["method"]
        echoed = client.get(f"{prefix}/fine_tuning/jobs/{job['id']}", **headers).json()
        assert echoed["method"] == job["method"] and echoed["training_type"] == "lora"
    chat = create(client, headers, training_file=chat_dataset(alice).public_id).json()
    assert chat["method"]["type"] == "supervised" and "beta" not in chat["method"]["supervised"]["hyperparameters"]
    assert "beta" not in chat["hyperparameters"]


def test_method_round_trips_through_the_openai_sdk(sdk, alice):
    pairs = pairs_dataset(alice)
    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=pairs.public_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 4}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    assert job.method.dpo.hyperparameters.n_epochs == 2 and job.method.dpo.hyperparameters.batch_size == 4
    fetched = sdk.fine_tuning.jobs.retrieve(job.id)
    assert fetched.method.type == "dpo" and fetched.method.dpo.hyperparameters.beta == 0.25
    assert [j.method.type for j in sdk.fine_tuning.jobs.list()] == ["dpo"]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(model=BASE, training_file=pairs.public_id, method={"type": "supervised"})
    assert "holds preference pairs" in refused.value.body["message"]


# --- A real DPO run ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(600)
def test_a_dpo_job_through_the_api_learns_to_prefer_the_preferred_answers(sdk, client, alice, tmp_path, monkeypatch):
    """Upload pairs, create a DPO job with the SDK, run it with the real engine, read back what it learnt."""
    from datasets_app import services as dataset_services

    queued = []
    monkeypatch.setattr(
        "datasets_app.tasks.validate_dataset.delay", lambda pk: dataset_services.dataset_validate(dataset_id=pk)
    )
    monkeypatch.setattr("datasets_app.tasks.compute_statistics.delay", lambda pk: None)
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", queued.append)

    uploaded = sdk.files.create(file=("pairs.jsonl", preference_lines(16)), purpose="fine-tune")
    assert sdk.files.retrieve(uploaded.id).status == "processed"
    assert Dataset.objects.get(public_id=uploaded.id).format == "preference"
    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=uploaded.id,
        validation_file=uploaded.id,  # validating on its own training pairs: what it learnt of them
        method=dpo_method(n_epochs=3, batch_size=4, learning_rate_multiplier=10, beta=0.1),
        seed=3,
    )
    assert job.method.type == "dpo" and len(queued) == 1

    services.job_run(job_id=queued[0], worker="test")
    done = sdk.fine_tuning.jobs.retrieve(job.id)
    row = FineTuningJob.objects.get(public_id=job.id)
    assert done.status == "succeeded", (done.error, list(row.events.values_list("message", flat=True)))

    card = ModelCard.objects.get(model_id=done.fine_tuned_model)
    assert card.objective == "dpo" and card.hyperparameters["beta"] == 0.1
    assert card.metrics["eval_reward_accuracy"] > 0.5, card.metrics
    assert card.metrics["eval_reward_margin"] > 0, card.metrics

    events = [e.data for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    events.sort(key=lambda data: data["step"])
    train_points = [data for data in events if data.get("train_reward_accuracy") is not None]
    valid_points = [data for data in events if data.get("valid_reward_accuracy") is not None]
    assert train_points and valid_points
    assert train_points[-1]["train_reward_accuracy"] > 0.5 and valid_points[-1]["valid_reward_accuracy"] > 0.5

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].metrics.to_dict()["train_reward_accuracy"] > 0.5, checkpoints[0].metrics
    # The engine keeps its newest checkpoints (and the best): every one still listed has its files.
    assert all(Path(c.path).is_dir() for c in Checkpoint.objects.filter(job__public_id=job.id))

    # Served like any fine-tuned model: an adapter on its base, from the web process's pool.
    answer = sdk.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Is parcel 3 ready?"}], max_tokens=6
    )
    assert answer.model == done.fine_tuned_model and answer.usage.completion_tokens > 0

    client.force_login(alice)
    playground = client.get("/playground/", {"a": BASE, "b": done.fine_tuned_model})
    assert playground.status_code == 200 and done.fine_tuned_model in playground.content.decode()
    rows = list(csv.DictReader(io.StringIO(client.get(f"/jobs/{job.id}/metrics.csv").content.decode())))
    assert any(r["train_reward_accuracy"] for r in rows) and any(r["valid_reward_margin"] for r in rows)
    page = client.get("/models/").content.decode()
    assert "Preference (DPO)" in page and "reward accuracy" in page
