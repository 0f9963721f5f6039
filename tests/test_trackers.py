"""Experiment trackers: OpenAI's `integrations` through the API, FT_REPORT_TO and the form, and real
training runs whose TensorBoard event files, MLflow run and offline W&B run are read back and
compared with the job's own metrics.

The openai SDK talks to this process's Django app (WSGI); runs train the tiny model with the real
engine in the test process, as a training worker does (`services.job_run`). Nothing leaves the
machine: W&B runs offline, MLflow writes a SQLite store in a temporary folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from finetune_site.models import ApiKey
from jobs_app import services, trackers
from jobs_app.models import FineTuningJob
from llm.train import checkpoint as ckpt

from .test_api_auth import auth
from .test_checkpoint_recovery import chat_file  # noqa: F401 - a processed chat file of 8 examples
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)
ALL = ["tensorboard", "mlflow", "wandb"]
WANDB = [{"type": "wandb", "wandb": {"project": "ft-tests", "name": "tiny run", "tags": ["unit"]}}]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    # One store for the module: a new MLflow database takes seconds to create.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch, tmp_path, mlflow_uri):
    """No network and nothing written outside the test's folders, whatever the machine's environment says."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)


@pytest.fixture
def train(alice, chat_file, monkeypatch):
    """Create a job (queued, not sent to a worker) and run it here with the real engine."""
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)

    def create_and_run(*, report_to=ALL, integrations=None, validate=True, **hyperparameters) -> FineTuningJob:
        job = services.job_create(
            owner=alice,
            model=BASE,
            training_file=chat_file.public_id,
            validation_file=chat_file.public_id if validate else None,
            hyperparameters={"batch_size": 4, "learning_rate_multiplier": 10, **hyperparameters},
            report_to=report_to,
            integrations=integrations,
        )
        services.job_run(job_id=job.pk, worker="test")
        job.refresh_from_db()
        return job

    return create_and_run


def job_points(job, key: str) -> dict[int, float]:
    """The job's own metric points (what its chart and the events API show), by step."""
    events = job.events.filter(type="metrics").order_by("step")
    return {e.step: e.data[key] for e in events if e.data.get(key) is not None}


def tensorboard_points(job, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(job.tracking["tensorboard"]["logdir"], size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step written twice: {steps}"
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def mlflow_client(job):
    from mlflow.tracking import MlflowClient

    return MlflowClient(job.tracking["mlflow"]["tracking_uri"])


def mlflow_history(job, key: str) -> list[tuple[int, float]]:
    history = mlflow_client(job).get_metric_history(job.tracking["mlflow"]["run_id"], key)
    return [(metric.step, metric.value) for metric in sorted(history, key=lambda m: (m.step, m.timestamp))]


def wandb_records(job) -> list[list[dict]]:
    """The records of each offline W&B run folder of the job, oldest first, through W&B's own reader."""
    where = job.tracking["wandb"]
    folders = sorted(Path(where["dir"]).glob(f"offline-run-*-{where['run_id']}"))
    assert folders, f"no offline run in {where['dir']}"
    cli = Path(sys.executable).with_name("wandb")
    runs = []
    for folder in folders:
        log = folder / f"run-{where['run_id']}.wandb"
        out = subprocess.run([cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True)
        runs.append([json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")])
    return runs


def wandb_points(records: list[dict], key: str) -> dict[int, float]:
    return {
        r["history"]["step"]["num"]: r["history"]["item"][key]
        for r in records
        if r["type"] == "history" and key in r["history"]["item"]
    }


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


# --- Real runs, read back -----------------------------------------------------------------


def test_every_tracker_records_the_jobs_own_numbers(train):
    job = train(integrations=WANDB, n_epochs=2, eval_every=1)  # 8 examples, batch 4: 4 steps, each validated

    assert job.status == FineTuningJob.SUCCEEDED, job.error
    assert set(job.tracking) == set(ALL)
    train_loss, valid_loss = job_points(job, "train_loss"), job_points(job, "valid_loss")
    assert sorted(train_loss) == [1, 2, 3, 4] and sorted(valid_loss) == [1, 2, 3, 4]

    # TensorBoard keeps float32: the same numbers to its precision.
    assert tensorboard_points(job, "train/loss") == pytest.approx(train_loss, rel=1e-6)
    assert tensorboard_points(job, "eval/loss") == pytest.approx(valid_loss, rel=1e-6)
    assert set(tensorboard_points(job, "train/lr")) == {1, 2, 3, 4}
    assert set(tensorboard_points(job, "train/grad_norm")) == {1, 2, 3, 4}

    assert dict(mlflow_history(job, "train/loss")) == train_loss
    assert dict(mlflow_history(job, "eval/loss")) == valid_loss
    assert dict(mlflow_history(job, "train/tokens_per_second")).keys() == train_loss.keys()
    run = mlflow_client(job).get_run(job.tracking["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == job.public_id
    assert run.data.params["n_epochs"] == "2" and run.data.params["base_model"] == BASE
    assert run.data.tags["finetune_console.job_id"] == job.public_id

    (records,) = wandb_records(job)
    assert wandb_points(records, "train/loss") == train_loss
    assert wandb_points(records, "eval/loss") == valid_loss
    (started,) = of_type(records, "run")
    assert started["run_id"] == job.public_id and started["project"] == "ft-tests"
    assert started["display_name"] == "tiny run" and "unit" in started["tags"]
    assert json.loads(json.dumps(started["config"]["update"]))["n_epochs"] == 2
    assert of_type(records, "exit")[-1]["exit_code"] == 0


def test_a_resumed_job_continues_the_same_runs_and_each_step_shows_the_number_the_job_kept(train):
    job = train(report_to=ALL, validate=False, n_epochs=3, save_every=1)  # 6 steps; checkpoints 5 and 6 kept
    first = dict(job.tracking)
    # The worker died after step 6 but before its checkpoint was safe: the next run trains step 6 again.
    shutil.rmtree(ckpt.checkpoint_dir(job.output_dir, 6))
    job.checkpoints.filter(step=6).delete()
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.QUEUED, fine_tuned_model="")

    services.job_run(job_id=job.pk, worker="test-2")
    job.refresh_from_db()

    assert job.status == FineTuningJob.SUCCEEDED, job.error
    assert job.tracking == first, "the same folder, MLflow run and W&B run"
    train_loss = job_points(job, "train_loss")
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    assert tensorboard_points(job, "train/loss") == pytest.approx(train_loss, rel=1e-6)  # step 6 once: the new one
    history = mlflow_history(job, "train/loss")
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6, 6]  # MLflow keeps both tries of step 6 ...
    assert dict(history[:5]) == {s: train_loss[s] for s in range(1, 6)} and history[-1] == (6, train_loss[6])
    assert mlflow_client(job).get_run(first["mlflow"]["run_id"]).info.status == "FINISHED"
    first_run, second_run = wandb_records(job)  # offline: one folder per run of the job, synced in order
    assert of_type(second_run, "run")[0]["run_id"] == job.public_id
    assert wandb_points(second_run, "train/loss") == {6: train_loss[6]}


def test_a_failed_run_closes_its_trackers_saying_so(alice, chat_file, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)

    def train_then_break(config, sink, should_stop):
        sink("metric", {"step": 1, "total_steps": 4, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.0})
        raise RuntimeError("the GPU fell off")

    monkeypatch.setattr("llm.train.train", train_then_break)
    job = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id, report_to=ALL)
    services.job_run(job_id=job.pk, worker="test")
    job.refresh_from_db()

    assert job.status == FineTuningJob.FAILED
    assert tensorboard_points(job, "train/loss") == {1: 2.5}
    assert mlflow_history(job, "train/loss") == [(1, 2.5)]
    assert mlflow_client(job).get_run(job.tracking["mlflow"]["run_id"]).info.status == "FAILED"
    (records,) = wandb_records(job)
    assert wandb_points(records, "train/loss") == {1: 2.5}
    assert of_type(records, "exit")[-1]["exit_code"] == 1


def test_a_tracker_that_fails_never_fails_the_job(train, monkeypatch):
    def broken(self, metrics, step):
        raise OSError("the MLflow store is gone")

    monkeypatch.setattr(trackers.MlflowTracker, "log", broken)
    job = train(report_to=["tensorboard", "mlflow"], validate=False, n_epochs=1)

    assert job.status == FineTuningJob.SUCCEEDED, job.error
    warnings = list(job.events.filter(level="warn").values_list("message", flat=True))
    assert warnings == ["MLflow stopped recording this run: OSError: the MLflow store is gone. Training goes on."]
    assert set(tensorboard_points(job, "train/loss")) == {1, 2}  # the others carry on


def test_a_tracker_whose_package_is_missing_is_a_warning(train, client, monkeypatch):
    def not_installed(run):
        raise ModuleNotFoundError("No module named 'wandb'")

    monkeypatch.setitem(trackers.BACKENDS, "wandb", not_installed)
    job = train(report_to=["wandb"], validate=False, n_epochs=1)

    assert job.status == FineTuningJob.SUCCEEDED, job.error
    (warning,) = job.events.filter(level="warn").values_list("message", flat=True)
    assert warning.startswith("Weights & Biases is not recording this run: its package is not installed (pip install")
    assert job.tracking == {}
    assert "Not recorded: the job&#x27;s events say why." in client.get(f"/jobs/{job.public_id}/").content.decode()


def test_a_job_without_trackers_imports_none_of_them(train):
    job = train(report_to=[], validate=False, n_epochs=1)

    assert job.status == FineTuningJob.SUCCEEDED and job.tracking == {}
    assert not (job.output_dir / "trackers").exists()
    # A fresh interpreter: the worker imports the sink and the trackers module without any tracker library.
    code = "import jobs_app.trackers, sys; print(sorted({'wandb', 'mlflow', 'tensorboard'} & set(sys.modules)))"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "finetune_site.settings"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# --- The API: integrations as OpenAI sends them -------------------------------------------


@pytest.fixture
def alice_key(alice):
    return ApiKey.issue(alice, name="test")[1]


@pytest.fixture
def sdk(alice_key, monkeypatch):
    """The official openai client, its requests served by this process's Django app."""
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    http = httpx.Client(transport=httpx.WSGITransport(app=WSGIHandler()), base_url="http://testserver")
    yield openai.OpenAI(base_url="http://testserver/v1", api_key=alice_key, http_client=http, max_retries=0)
    http.close()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def test_integrations_round_trip_through_the_openai_sdk(sdk, chat_file):
    sent = [{"type": "wandb", "wandb": {"project": "my-project", "name": "run-1", "entity": "team", "tags": ["a"]}}]
    created = sdk.fine_tuning.jobs.create(model=BASE, training_file=chat_file.public_id, integrations=sent)

    assert [i.model_dump(exclude_none=True) for i in created.integrations] == sent
    assert sdk.fine_tuning.jobs.retrieve(created.id).integrations == created.integrations
    listed = next(job for job in sdk.fine_tuning.jobs.list() if job.id == created.id)
    assert listed.integrations == created.integrations
    job = FineTuningJob.objects.get(public_id=created.id)
    assert job.integrations == sent and job.trackers == ["wandb"]
    plain = sdk.fine_tuning.jobs.create(model=BASE, training_file=chat_file.public_id)
    assert plain.integrations == []


def test_integrations_are_accepted_on_the_zhipuai_prefix_too(client, alice_key, chat_file, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    body = {"model": BASE, "training_file": chat_file.public_id, "integrations": WANDB}
    response = client.post("/api/paas/v4/fine_tuning/jobs", body, content_type="application/json", **auth(alice_key))

    assert response.status_code == 200, response.content
    assert response.json()["integrations"] == WANDB


@pytest.mark.parametrize(
    "integrations, param",
    [
        ({"type": "wandb"}, "integrations"),
        (["wandb"], "integrations[0]"),
        ([{"type": "comet", "comet": {}}], "integrations[0].type"),
        ([{"type": "wandb"}], "integrations[0].wandb"),
        ([{"type": "wandb", "wandb": {}}], "integrations[0].wandb.project"),
        ([{"type": "wandb", "wandb": {"project": "  "}}], "integrations[0].wandb.project"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": "a,b"}}], "integrations[0].wandb.tags"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}], "integrations[0].wandb.tags"),
        ([{"type": "wandb", "wandb": {"project": "p", "team": "t"}}], "integrations[0].wandb.team"),
        ([{"type": "wandb", "wandb": {"project": 7}}], "integrations[0].wandb.project"),
        (WANDB + WANDB, "integrations"),
    ],
)
def test_a_bad_integration_is_a_400_naming_the_field(sdk, chat_file, integrations, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(model=BASE, training_file=chat_file.public_id, integrations=integrations)

    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param, refused.value.body
    assert not FineTuningJob.objects.exists()


def test_report_to_defaults_to_ft_report_to_and_unknown_names_are_a_400(sdk, chat_file, settings):
    settings.FT_REPORT_TO = ["mlflow"]
    job = sdk.fine_tuning.jobs.create(model=BASE, training_file=chat_file.public_id)
    assert FineTuningJob.objects.get(public_id=job.id).report_to == ["mlflow"]
    job = sdk.fine_tuning.jobs.create(
        model=BASE, training_file=chat_file.public_id, extra_body={"report_to": ["wandb", "tensorboard"]}
    )
    assert FineTuningJob.objects.get(public_id=job.id).report_to == ["tensorboard", "wandb"]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(
            model=BASE, training_file=chat_file.public_id, extra_body={"report_to": ["neptune"]}
        )
    assert refused.value.body["param"] == "report_to" and "'neptune'" in refused.value.body["message"]


def test_an_unknown_name_in_ft_report_to_stops_the_start_saying_so(tmp_path):
    env = {**os.environ, "FT_HOME": str(tmp_path), "FT_REPORT_TO": "tensorboard, wandb,neptune"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )

    assert result.returncode != 0
    assert "FT_REPORT_TO names an unknown tracker 'neptune'; use a comma list of tensorboard, mlflow, wandb" in (
        result.stderr
    )


# --- The pages ---------------------------------------------------------------------------


def test_the_form_offers_the_trackers_and_the_job_keeps_the_choice(client, alice, chat_file, settings, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    settings.FT_REPORT_TO = ["tensorboard"]
    page = client.get("/jobs/new/").content.decode()
    assert 'name="report_to" value="tensorboard"' in page and 'value="wandb"' in page
    assert 'value="tensorboard" id="id_report_to_0" checked' in page  # FT_REPORT_TO is the default

    form = {"model": BASE, "training_file": chat_file.public_id, "method": "lora", "seed": 42, "n_epochs": 1}
    response = client.post("/jobs/new/", {**form, "report_to": ["mlflow", "wandb"]})

    assert response.status_code == 302, response.content.decode()[:2000]
    assert FineTuningJob.objects.get().report_to == ["mlflow", "wandb"]


def test_the_job_page_shows_where_each_tracker_wrote_only_to_its_owner(train, client, django_user_model):
    job = train(report_to=ALL, validate=False, n_epochs=1)

    page = client.get(f"/jobs/{job.public_id}/").content.decode()
    logdir, mlflow, wandb = (job.tracking[name] for name in ALL)
    assert f"tensorboard --logdir {logdir['logdir']}" in page
    assert f"mlflow ui --backend-store-uri {mlflow['tracking_uri']}" in page and mlflow["run_id"] in page
    assert f"wandb sync {wandb['dir']}/offline-run-*-{job.public_id}" in page
    charlie = django_user_model.objects.create_user("charlie", password="pw-charlie-123")
    client.force_login(charlie)
    assert client.get(f"/jobs/{job.public_id}/").status_code == 404


def test_a_queued_job_page_says_its_trackers_start_with_training(client, alice, chat_file, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    job = services.job_create(
        owner=alice, model=BASE, training_file=chat_file.public_id, report_to=["tensorboard"], integrations=WANDB
    )

    page = client.get(f"/jobs/{job.public_id}/").content.decode()
    assert "Experiment trackers" in page and "TensorBoard" in page and "Weights &amp; Biases" in page
    assert "Written once training starts." in page


def test_the_settings_names_and_the_trackers_agree():
    source = (Path(__file__).parent.parent / "finetune_site" / "settings.py").read_text()
    assert f"{tuple(trackers.LABELS)!r}".replace("'", '"') in source
    assert trackers.BACKENDS.keys() == trackers.LABELS.keys() == trackers.PACKAGES.keys()


# --- Through the real training worker of a running stack ---------------------------------------


@pytest.fixture(scope="module")
def tracking_stack(tmp_path_factory, tiny_model_dir):
    from llm.bundled import TINY_MODEL_ID

    from .live import start_stack, stop_stack

    # FT_REPORT_TO as an operator sets it; W&B forced offline whatever this machine's environment holds.
    env = {"FT_REPORT_TO": "tensorboard,mlflow", "WANDB_MODE": "offline", "WANDB_API_KEY": ""}
    running = start_stack(
        tmp_path_factory.mktemp("trackers-stack"), {TINY_MODEL_ID: tiny_model_dir}, env=env, timeout=420
    )
    yield running
    stop_stack(running)


@pytest.mark.live
@pytest.mark.timeout(600)
def test_the_training_worker_writes_what_the_events_api_shows_to_every_tracker(tracking_stack):
    from types import SimpleNamespace

    from llm.bundled import TINY_MODEL_ID

    from .live import chat_lines, wait_finished

    stack = tracking_stack
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("admin"), max_retries=0, timeout=60)
    uploaded = client.files.create(file=("t.jsonl", chat_lines(8)), purpose="fine-tune")
    created = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        integrations=WANDB,
    )
    done = wait_finished(client, created.id)

    assert done.status == "succeeded", done.error
    assert [i.model_dump(exclude_none=True) for i in done.integrations] == WANDB
    events = client.fine_tuning.jobs.list_events(created.id, limit=100)
    train_loss = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics" and e.data["train_loss"]}
    assert sorted(train_loss) == [1, 2, 3, 4]
    shell = f"import json; from jobs_app.models import FineTuningJob as J; print(json.dumps(J.objects.get(public_id='{created.id}').tracking))"
    job = SimpleNamespace(tracking=json.loads(stack.manage("shell", "-c", shell).stdout.strip().splitlines()[-1]))
    assert set(job.tracking) == set(ALL)
    assert job.tracking["mlflow"]["tracking_uri"] == f"sqlite:///{stack.home / 'mlflow.db'}"  # the default store
    assert tensorboard_points(job, "train/loss") == pytest.approx(train_loss, rel=1e-6)
    assert dict(mlflow_history(job, "train/loss")) == train_loss
    (records,) = wandb_records(job)
    assert wandb_points(records, "train/loss") == train_loss
