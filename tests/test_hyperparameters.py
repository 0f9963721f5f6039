"""One definition per hyperparameter: the form, the API, its schema and the engine all read it."""

from dataclasses import fields, replace

import pytest
from django.contrib.auth import get_user_model

from finetune_site.models import ApiKey
from jobs_app.forms import JobForm
from jobs_app.hyperparameters import HOLDOUT_PERCENT, METHODS, SETTING_LABELS
from jobs_app.models import FineTuningJob
from llm.train import TrainConfig
from llm.train.hyperparameters import (
    BASE_LEARNING_RATE,
    ENGINE_NAMES,
    HYPERPARAMETERS,
    LEARNING_RATE_MULTIPLIER,
    resolve,
    to_engine,
)

from .test_api_auth import auth, make_dataset

pytestmark = pytest.mark.django_db

NUMERIC = [definition for definition in HYPERPARAMETERS if definition.type is not str]
ENGINE_CHECKED = [definition for definition in NUMERIC if definition.engine_name]


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def headers(alice):
    return auth(ApiKey.issue(alice, name="test")[1])


@pytest.fixture
def dataset(alice):
    return make_dataset(alice, examples=40)


def create(client, headers, dataset, prefix="/v1", **extra):
    body = {"model": "tiny-random-smollm2", "training_file": dataset.public_id, **extra}
    return client.post(f"{prefix}/fine_tuning/jobs", body, content_type="application/json", **headers)


def too_big(definition):
    return definition.maximum + (1 if definition.type is int else definition.maximum)


def test_it_puts_every_definition_in_the_form_with_its_bounds_and_doc(alice):
    form = JobForm(user=alice)
    for definition in HYPERPARAMETERS:
        field = form.fields[definition.name]
        assert field.label == definition.label
        assert definition.doc in field.help_text
        if definition.type is not str:
            assert (field.widget.attrs["min"], field.widget.attrs["max"]) == (definition.minimum, definition.maximum)
    assert set(form.hyperparameter_names) == {definition.name for definition in HYPERPARAMETERS}


def test_it_puts_every_definition_in_the_api_schema_with_its_type_bounds_and_doc(client, alice):
    client.force_login(alice)
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    properties = schema["components"]["schemas"]["Hyperparameters"]["properties"]
    assert set(properties) == {definition.name for definition in HYPERPARAMETERS}
    for definition in HYPERPARAMETERS:
        described = properties[definition.name]
        value = described["oneOf"][0]
        assert value["type"] == {int: "integer", float: "number", str: "string"}[definition.type]
        assert (value.get("minimum"), value.get("maximum")) == (definition.minimum, definition.maximum)
        assert definition.doc in described["description"] and described["oneOf"][1]["enum"] == ["auto"]
    job_input = schema["components"]["schemas"]["JobCreateInput"]["properties"]
    assert (job_input["holdout_percent"]["minimum"], job_input["holdout_percent"]["maximum"]) == (0, 50)


@pytest.mark.parametrize("definition", ENGINE_CHECKED, ids=lambda d: d.name)
def test_the_engine_checks_the_same_bounds(tiny_model_dir, tmp_path, definition):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("{}\n")
    # With validations to watch, so early stopping's own needs stay out of the way.
    config = TrainConfig(
        model=str(tiny_model_dir),
        train_file=str(train_file),
        validation_file=str(train_file),
        out_dir=str(tmp_path / "out"),
        eval_every=1,
        objective=definition.objectives[0],  # beta is checked for dpo, the objective it means something for
    )
    field = definition.engine_name

    def refused(value):
        return [problem for problem in replace(config, **{field: value}).problems() if problem.startswith(f"{field}:")]

    assert refused(definition.minimum) == [] and refused(definition.maximum) == []
    assert refused(too_big(definition)) == [
        f"{field}: must be {'a whole number' if definition.type is int else 'a number'} "
        f"<= {definition.maximum}, got {too_big(definition)!r}"
    ]
    below = definition.minimum - (1 if definition.type is int else 0.01)
    assert refused(below) and str(definition.minimum) in refused(below)[0]


def test_the_engine_takes_its_defaults_and_names_from_the_definitions():
    defaults = {field.name: field.default for field in fields(TrainConfig)}
    for definition in HYPERPARAMETERS:
        if definition.engine_name:
            assert defaults[definition.engine_name] == definition.default, definition.name
    assert defaults["lr"] == BASE_LEARNING_RATE["lora"] * LEARNING_RATE_MULTIPLIER.default
    assert set(ENGINE_NAMES.values()) <= set(defaults)
    assert set(BASE_LEARNING_RATE) == set(METHODS)


def test_to_engine_turns_resolved_settings_into_a_config_the_engine_accepts(tiny_model_dir, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("{}\n")
    for method in ("lora", "full"):
        resolved = resolve({"n_epochs": 2, "learning_rate_multiplier": 2.0, "lora_rank": 4}, method=method, examples=40)
        engine = to_engine(resolved)
        assert engine["epochs"] == 2 and engine["lr"] == BASE_LEARNING_RATE[method] * 2
        assert ("lora_r" in engine) is (method != "full")
        config = TrainConfig(
            model=str(tiny_model_dir), train_file=str(train_file), out_dir=str(tmp_path), method=method, **engine
        )
        assert config.problems() == []


def test_the_pages_have_a_label_for_every_setting():
    assert {definition.name for definition in HYPERPARAMETERS} <= set(SETTING_LABELS)


@pytest.mark.parametrize("definition", NUMERIC, ids=lambda d: d.name)
def test_an_out_of_bounds_value_is_refused_with_the_same_message_by_the_form_and_the_api(
    client, headers, alice, dataset, definition
):
    value = too_big(definition)
    form = JobForm(data={definition.name: str(value)}, user=alice)
    assert not form.is_valid()

    response = create(client, headers, dataset, hyperparameters={definition.name: value})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == f"hyperparameters.{definition.name}"
    assert form.errors[definition.name] == [error["message"]]
    assert (
        error["message"]
        == f"{definition.name} must be between {definition.minimum} and {definition.maximum}, got {value}."
    )


def test_the_form_refuses_bad_module_names_with_the_api_message(client, headers, alice, dataset):
    form = JobForm(data={"target_modules": "q_proj; rm -rf"}, user=alice)
    response = create(client, headers, dataset, hyperparameters={"target_modules": "q_proj; rm -rf"})
    assert not form.is_valid() and form.errors["target_modules"] == [response.json()["error"]["message"]]


@pytest.mark.parametrize("prefix", ["/v1", "/api/paas/v4"])
def test_the_api_holds_out_validation_data_like_the_form(client, headers, dataset, prefix):
    response = create(
        client, headers, dataset, prefix=prefix, holdout_percent=20, hyperparameters={"early_stopping_patience": 2}
    )

    assert response.status_code == 200, response.content
    job = FineTuningJob.objects.get(public_id=response.json()["id"])
    assert job.holdout_percent == 20 and job.status == FineTuningJob.VALIDATING
    assert response.json()["status"] == "validating_files"


def test_the_api_refuses_a_holdout_with_the_forms_message(client, headers, alice, dataset):
    form = JobForm(data={"holdout_percent": "60"}, user=alice)
    assert not form.is_valid()

    too_much = create(client, headers, dataset, holdout_percent=60)
    not_a_number = create(client, headers, dataset, holdout_percent="ten")
    with_a_file = create(client, headers, dataset, holdout_percent=10, validation_file=dataset.public_id)

    assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "holdout_percent"
    assert (
        form.errors["holdout_percent"]
        == [too_much.json()["error"]["message"]]
        == [f"holdout_percent must be between 0 and {HOLDOUT_PERCENT.maximum}, got 60."]
    )
    assert (
        not_a_number.status_code == 400
        and not_a_number.json()["error"]["message"] == "holdout_percent must be an integer, got 'ten'."
    )
    assert (
        with_a_file.status_code == 400
        and "only when no validation file is given" in with_a_file.json()["error"]["message"]
    )
    assert not FineTuningJob.objects.exists()
