"""Job pages and the pieces behind them, without a worker: create form, estimate, list, compare, downloads."""

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.models import Dataset
from finetune_site.errors import InvalidInput, InvalidState
from jobs_app import services
from jobs_app.hyperparameters import check_hyperparameters, resolve_hyperparameters
from jobs_app.models import FineTuningJob, JobEvent
from jobs_app.sink import JobSink

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


@pytest.fixture
def dataset(alice):
    ds = Dataset(
        owner=alice,
        filename="d.jsonl",
        bytes=4000,
        status=Dataset.PROCESSED,
        examples=40,
        report={"tokens": {"billable_tokens": 2000}},
    )
    ds.file.save("d.jsonl", SimpleUploadedFile("d.jsonl", b"{}\n"), save=True)
    return ds


RUNNING = {"status": "running", "worker": "w1", "attempts": 1}
"""A job as its worker's run holds it: the sink writes only then."""


def make_job(owner, dataset, **fields):
    defaults = dict(
        owner=owner,
        base_model="tiny-random-smollm2",
        training_file=dataset,
        training_file_ref=dataset.public_id,
        resolved=resolve_hyperparameters({}, method="lora", examples=40),
    )
    return FineTuningJob.objects.create(**{**defaults, **fields})


def test_auto_hyperparameters_resolve_to_numbers():
    resolved = resolve_hyperparameters({"n_epochs": "auto", "lora_rank": 8}, method="lora", examples=40)
    assert resolved["lora_rank"] == 8 and resolved["lora_alpha"] == 16
    assert isinstance(resolved["n_epochs"], int) and resolved["total_steps"] > 0
    assert resolved["target_modules"] == "all-linear"


def test_check_hyperparameters_names_the_bad_field():
    with pytest.raises(InvalidInput) as caught:
        check_hyperparameters({"batch_size": 2.5})
    assert caught.value.param == "hyperparameters.batch_size"
    with pytest.raises(InvalidInput):
        check_hyperparameters({"target_modules": "q_proj; rm -rf"})
    assert check_hyperparameters({"target_modules": "q_proj,v_proj"}) == {"target_modules": "q_proj,v_proj"}


def test_the_create_page_shows_resolved_values_tokens_cost_and_time(client, alice, dataset, settings):
    settings.FT_PRICE_PER_1K_TOKENS = 0.5
    page = client.get(f"/jobs/new/?training_file={dataset.public_id}").content.decode()
    assert "Create fine-tuning task" in page and "Before you start" in page
    assert "2,000 per epoch" in page
    response = client.post(
        "/jobs/estimate/",
        {"model": "tiny-random-smollm2", "training_file": dataset.public_id, "method": "lora", "n_epochs": "3"},
    )
    html = response.content.decode()
    assert "6,000 in all" in html and "3.0000 at 0.5" in html and "tokens/s" in html
    settings.FT_PRICE_PER_1K_TOKENS = 0.0
    html = client.post(
        "/jobs/estimate/", {"model": "tiny-random-smollm2", "training_file": dataset.public_id}
    ).content.decode()
    assert "set FT_PRICE_PER_1K_TOKENS to see a cost estimate" in html and "0.0000" not in html


def test_the_estimate_follows_the_maximum_sequence_length(client, alice, dataset):
    dataset.report = {
        "tokens": {
            "billable_tokens": 2000,
            "max_seq_len": 1024,
            "billable_tokens_by_max_seq_len": {"256": 900, "512": 1500, "1024": 2000},
        }
    }
    dataset.save()
    form = {"model": "tiny-random-smollm2", "training_file": dataset.public_id, "method": "lora", "n_epochs": "1"}
    assert "2,000 per epoch" in client.post("/jobs/estimate/", form).content.decode()
    assert "1,500 per epoch" in client.post("/jobs/estimate/", {**form, "max_seq_len": "512"}).content.decode()
    assert "1,200 per epoch" in client.post("/jobs/estimate/", {**form, "max_seq_len": "384"}).content.decode()


def test_submitting_the_form_queues_a_job(client, alice, dataset, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: sent.append(pk))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/jobs/new/",
            {
                "model": "tiny-random-smollm2",
                "training_file": dataset.public_id,
                "method": "lora",
                "n_epochs": "2",
                "suffix": "first",
                "seed": "7",
            },
        )
    job = FineTuningJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.public_id}/"
    assert job.status == "queued" and job.hyperparameters == {"n_epochs": 2} and job.seed == 7
    assert sent == [job.pk]


def test_an_unknown_model_is_a_form_error_not_a_500(client, alice, dataset):
    response = client.post("/jobs/new/", {"model": "nope", "training_file": dataset.public_id, "method": "lora"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()


def test_new_job_like_this_prefills_the_form(client, alice, dataset):
    job = make_job(alice, dataset, hyperparameters={"n_epochs": 7, "lora_rank": 4}, suffix="again", seed=99)
    page = client.get(f"/jobs/new/?like={job.public_id}").content.decode()
    assert 'name="n_epochs" value="7"' in page and 'name="lora_rank" value="4"' in page
    assert 'name="suffix" value="again"' in page and 'name="seed" value="99"' in page


def test_new_job_like_a_holdout_job_asks_for_the_same_holdout(client, alice, dataset, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.prepare_holdout.delay", lambda pk, percent: None)
    client.post(
        "/jobs/new/",
        {
            "model": "tiny-random-smollm2",
            "training_file": dataset.public_id,
            "method": "lora",
            "holdout_percent": "15",
            "early_stopping_patience": "2",
        },
    )
    job = FineTuningJob.objects.get()
    assert job.holdout_percent == 15 and job.status == "validating_files"
    page = client.get(f"/jobs/new/?like={job.public_id}").content.decode()
    assert 'name="holdout_percent" value="15"' in page and 'name="early_stopping_patience" value="2"' in page
    # Once split, the job's files are the two parts: those are offered, not a second split.
    part = make_job(alice, dataset).training_file
    FineTuningJob.objects.filter(pk=job.pk).update(validation_file=part, validation_file_ref=part.public_id)
    page = client.get(f"/jobs/new/?like={job.public_id}").content.decode()
    assert 'name="holdout_percent" value="15"' not in page
    validation_select = page.split('name="validation_file"', 1)[1].split("</select>", 1)[0]
    assert f'<option value="{part.public_id}" selected>' in validation_select


def test_the_list_searches_filters_and_shows_queue_positions(client, alice, dataset):
    first = make_job(alice, dataset, suffix="alpha", status="queued")
    make_job(alice, dataset, suffix="beta", status="succeeded")
    page = client.get("/jobs/?q=alpha").content.decode()
    assert first.public_id in page and "beta" not in page
    assert "#1 in queue" in page
    assert "alpha" not in client.get("/jobs/?status=succeeded").content.decode()


def test_a_retried_job_queues_behind_the_jobs_already_waiting(client, alice, dataset, monkeypatch):
    from jobs_app import services as job_services
    from jobs_app.selectors import queue_position

    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    older = make_job(alice, dataset, suffix="older", status="failed")
    newer = make_job(alice, dataset, suffix="newer", status="queued")
    job_services.job_retry(job=older)
    assert (queue_position(newer), queue_position(older)) == (1, 2)
    assert "position 2 in the training queue" in client.get(f"/jobs/{older.public_id}/").content.decode()


def test_the_job_page_names_settings_and_files_as_people_read_them(client, alice, dataset):
    job = make_job(
        alice,
        dataset,
        resolved=resolve_hyperparameters({"early_stopping_patience": 3}, method="lora", examples=40),
        **RUNNING,
    )
    JobSink(job).event(f"Saved {job.output_dir}/adapter")
    page = client.get(f"/jobs/{job.public_id}/").content.decode()
    assert "<dt>Batch size (examples per step)</dt>" in page and "<dt>n_epochs</dt>" not in page
    assert "after 3 evaluations without a better validation loss" in page and "<dd>each epoch</dd>" in page
    assert "Saved adapter" in page and str(job.output_dir) not in page
    assert "<dd>never (no validation data)</dd>" in page and "<dd>3% of the steps</dd>" in page


def test_compare_marks_settings_that_differ_even_when_they_read_alike(client, alice, dataset):
    jobs = [
        make_job(
            alice,
            dataset,
            **RUNNING,
            resolved=resolve_hyperparameters({"warmup_ratio": ratio}, method="lora", examples=40),
        )
        for ratio in (0.031, 0.0310001)
    ]
    page = client.get(f"/jobs/compare/?ids={jobs[0].public_id}&ids={jobs[1].public_id}").content.decode()
    assert '<tr class="differs"><td>Warmup</td><td>3.1% of the steps</td><td>3.1% of the steps</td>' in page
    assert "<tr><td>Epochs</td>" in page


def test_metrics_csv_and_log_downloads(client, alice, dataset):
    job = make_job(alice, dataset, **RUNNING)
    sink = JobSink(job)
    sink("metric", {"step": 1, "total_steps": 2, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "tokens": 10})
    sink("eval", {"step": 1, "eval_loss": 2.7, "eval_token_accuracy": 0.4})
    sink("event", {"level": "info", "message": "hello log"})
    sink.flush()
    csv_text = client.get(f"/jobs/{job.public_id}/metrics.csv").content.decode()
    assert csv_text.splitlines()[0].startswith("step,epoch,train_loss")
    assert "2.5" in csv_text and "2.7" in csv_text
    assert "hello log" in client.get(f"/jobs/{job.public_id}/log.txt").content.decode()


def test_the_sink_warns_when_validation_rises_while_training_falls(alice, dataset):
    job = make_job(alice, dataset, **RUNNING)
    sink = JobSink(job)
    for step, (train, valid) in enumerate([(3.0, 2.0), (2.0, 2.1), (1.0, 2.2), (0.5, 2.3)], start=1):
        sink("metric", {"step": step, "total_steps": 4, "loss": train})
        sink("eval", {"step": step, "eval_loss": valid})
    sink.flush()
    warnings = job.events.filter(level="warn")
    assert warnings.count() == 1 and "Overfitting" in warnings.first().message


def test_compare_overlays_curves_and_marks_differences(client, alice, dataset):
    a = make_job(alice, dataset, seed=1)
    b = make_job(alice, dataset, seed=2)
    for job in (a, b):
        JobEvent.objects.create(job=job, type="metrics", step=1, data={"step": 1, "train_loss": 1.0})
    page = client.get(f"/jobs/compare/?ids={a.public_id}&ids={b.public_id}").content.decode()
    assert 'data-figure="compare-figure"' in page
    assert '<tr class="differs"><td>Seed</td>' in page


def test_retry_requeues_a_failed_job(alice, dataset, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: sent.append(pk))
    job = make_job(alice, dataset, status="failed", error={"code": "x", "message": "boom", "param": None})
    with django_capture_on_commit_callbacks(execute=True):
        services.job_retry(job=job)
    job.refresh_from_db()
    assert job.status == "queued" and job.error is None and sent == [job.pk]
    with pytest.raises(InvalidState):
        services.job_retry(job=job)


def test_stale_running_jobs_are_requeued(alice, dataset, django_capture_on_commit_callbacks, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    stale = make_job(alice, dataset, status="running", heartbeat_at=timezone.now() - timedelta(minutes=5), worker="w1")
    fresh = make_job(alice, dataset, status="running", heartbeat_at=timezone.now(), worker="w2")
    with django_capture_on_commit_callbacks(execute=True):
        assert services.recover_stale_jobs() == [stale.public_id]
    stale.refresh_from_db(), fresh.refresh_from_db()
    assert stale.status == "queued" and fresh.status == "running"


def test_bob_cannot_see_alices_job_page(client, alice, dataset):
    job = make_job(alice, dataset)
    client.force_login(get_user_model().objects.create_user("bob", password="pw-bob-123"))
    assert client.get(f"/jobs/{job.public_id}/").status_code == 404
    assert client.get(f"/jobs/{job.public_id}/metrics.csv").status_code == 404


def test_early_stopping_gets_validations_to_compare_and_needs_validation_data(alice, dataset):
    resolved = resolve_hyperparameters({"early_stopping_patience": 3}, method="lora", examples=40)
    assert resolved["eval_every"] >= 1 and resolved["early_stopping_patience"] == 3
    with pytest.raises(InvalidInput) as caught:
        services.job_create(
            owner=alice,
            model="tiny-random-smollm2",
            training_file=dataset.public_id,
            hyperparameters={"early_stopping_patience": 3},
        )
    assert caught.value.param == "hyperparameters.early_stopping_patience"


def job_stream(user, job):
    """The job's websocket consumer, spoken to by hand: channels.testing would import daphne, which is not installed."""
    from asgiref.testing import ApplicationCommunicator

    from jobs_app.consumers import JobConsumer

    scope = {
        "type": "websocket",
        "path": f"/ws/jobs/{job.public_id}/",
        "headers": [],
        "subprotocols": [],
        "user": user,
        "url_route": {"kwargs": {"public_id": job.public_id}},
    }
    return ApplicationCommunicator(JobConsumer.as_asgi(), scope)


@pytest.mark.django_db(transaction=True)
def test_joining_the_live_stream_brings_the_points_and_the_status_missed_since_the_page_was_drawn(alice, dataset):
    import asyncio
    import json

    job = make_job(alice, dataset, status="queued")
    # The page was drawn while queued; then the job started and logged two steps.
    FineTuningJob.objects.filter(pk=job.pk).update(status="running")
    for step in (1, 2):
        JobEvent.objects.create(job=job, type="metrics", step=step, data={"step": step, "train_loss": 2.0})

    async def sync():
        socket = job_stream(alice, job)
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(5))["type"] == "websocket.accept"
        await socket.send_input({"type": "websocket.receive", "text": json.dumps({"type": "sync", "after_step": 1})})
        replies = [json.loads((await socket.receive_output(5))["text"]) for _ in range(2)]
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(5)
        return replies

    replies = asyncio.run(sync())
    assert replies[0]["type"] == "metric" and replies[0]["step"] == 2
    assert replies[1] == {"type": "status", "status": "running"}


@pytest.mark.django_db(transaction=True)
def test_a_malformed_message_on_the_live_stream_is_ignored_and_the_stream_stays_up(alice, dataset):
    import asyncio
    import json

    job = make_job(alice, dataset, status="running")
    JobEvent.objects.create(job=job, type="metrics", step=1, data={"step": 1, "train_loss": 2.0})

    async def talk():
        socket = job_stream(alice, job)
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(5))["type"] == "websocket.accept"
        for junk in ("not json", "[1, 2]", '"sync"', json.dumps({"type": "sync", "after_step": "x"})):
            await socket.send_input({"type": "websocket.receive", "text": junk})
        await socket.send_input({"type": "websocket.receive", "text": json.dumps({"type": "sync", "after_step": 0})})
        replies = [json.loads((await socket.receive_output(5))["text"]) for _ in range(2)]
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(5)
        return replies

    replies = asyncio.run(talk())
    assert replies[0]["type"] == "metric" and replies[0]["step"] == 1
    assert replies[1] == {"type": "status", "status": "running"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("origin", "refused"),
    [("http://127.0.0.1:8000", False), ("http://127.0.0.1:9999", True), ("http://localhost:8000", True)],
)
def test_the_live_stream_opens_only_from_this_sites_own_pages(origin, refused, settings):
    """Another server on the same host (another port) must not open a logged-in user's job stream."""
    import asyncio

    from asgiref.testing import ApplicationCommunicator

    from finetune_site.asgi import application

    settings.CSRF_TRUSTED_ORIGINS = []

    async def handshake():
        scope = {
            "type": "websocket",
            "path": "/ws/jobs/ftjob-none/",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"origin", origin.encode())],
            "subprotocols": [],
        }
        socket = ApplicationCommunicator(application, scope)
        await socket.send_input({"type": "websocket.connect"})
        reply = await socket.receive_output(5)
        await socket.wait(5)
        return reply

    reply = asyncio.run(handshake())
    # 4403: refused at the door; 4404: let in, then told there is no such job for this (anonymous) user.
    assert reply == {"type": "websocket.close", "code": 4403 if refused else 4404}
