"""A run writes only while the job is its own: the watchdog survives database hiccups, gives the job up
when it cannot confirm it, and a stale attempt (re-queued, even if re-claimed by the same worker)
writes no metrics, no checkpoints, no model and no notice."""

import os
import time

import pytest
from django.db import OperationalError

from deployments_app.models import ModelCard
from finetune_site.models import Notification
from jobs_app import services, transitions
from jobs_app.models import Checkpoint, FineTuningJob, JobEvent
from jobs_app.sink import JobSink, Watchdog

from .test_api_auth import make_dataset
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)  # the watchdog's thread has its own connection


@pytest.fixture
def running(alice):
    dataset = make_dataset(alice, format="chat", examples=8)
    job = FineTuningJob.objects.create(
        owner=alice, base_model=BASE, training_file=dataset, training_file_ref=dataset.public_id
    )
    assert transitions.start(job, worker="w1")
    return job


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def reclaim(job, worker="w1"):
    """What recovery does to a stalled run's job, and a worker claiming it again: the next attempt."""
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.QUEUED, worker="")
    fresh = FineTuningJob.objects.get(pk=job.pk)
    assert transitions.start(fresh, worker=worker)
    return fresh


def test_the_watchdog_keeps_watching_through_database_errors(running, monkeypatch):
    failures = {"left": 3}
    real = transitions.heartbeat

    def flaky(job_pk, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real(job_pk, **kwargs)

    monkeypatch.setattr(transitions, "heartbeat", flaky)
    with Watchdog(running, heartbeat_seconds=0.05, poll_seconds=0.05) as watchdog:
        assert wait_for(lambda: failures["left"] == 0)
        transitions.request_cancel(running)
        assert wait_for(lambda: watchdog.should_stop() == "cancel")  # the user's cancel still arrives
        assert not watchdog.lost


def test_the_watchdog_stops_the_run_when_it_cannot_confirm_the_job_past_the_timeout(running, monkeypatch):
    def down(job_pk, **kwargs):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(transitions, "heartbeat", down)
    with Watchdog(running, heartbeat_seconds=0.05, poll_seconds=0.05, timeout_seconds=0.5) as watchdog:
        assert wait_for(lambda: watchdog.lost, seconds=5)
        assert watchdog.should_stop() == "cancel"


def test_a_watchdog_of_an_earlier_attempt_on_the_same_worker_gives_the_job_up(running):
    with Watchdog(running, heartbeat_seconds=0.05, poll_seconds=0.05) as watchdog:
        reclaim(running)  # the same worker name, the next attempt
        assert wait_for(lambda: watchdog.lost)
    assert FineTuningJob.objects.get(pk=running.pk).status == FineTuningJob.RUNNING  # the new run keeps it


def test_a_stale_attempts_metrics_checkpoints_and_events_are_not_written(running, tmp_path):
    sink = JobSink(running)
    sink("metric", {"step": 1, "total_steps": 4, "loss": 2.0})
    sink.flush()
    reclaim(running)

    sink("metric", {"step": 2, "total_steps": 4, "loss": 1.5})
    sink("checkpoint", {"step": 2, "path": str(tmp_path / "step-2"), "metrics": {}})
    sink.event("Saved the adapter")
    sink.flush()

    assert sink.lost
    assert list(JobEvent.objects.filter(job=running, type=JobEvent.METRICS).values_list("step", flat=True)) == [1]
    assert not Checkpoint.objects.filter(job=running).exists()
    assert not JobEvent.objects.filter(job=running, message="Saved the adapter").exists()


def test_a_finished_run_that_lost_its_job_makes_no_model_and_tells_no_one(running):
    sink = JobSink(running)
    stale = FineTuningJob.objects.get(pk=running.pk)
    reclaim(running)

    services._finish_run(stale, {"train_tokens": 10, "stopped": None}, None, sink)

    job = FineTuningJob.objects.get(pk=running.pk)
    assert job.status == FineTuningJob.RUNNING and job.attempts == 2 and not job.fine_tuned_model
    assert not ModelCard.objects.exists()
    assert not Notification.objects.exists()


def test_a_run_that_holds_its_job_finishes_with_its_model_and_notice(running):
    services._finish_run(running, {"train_tokens": 10, "stopped": None}, None, JobSink(running))

    job = FineTuningJob.objects.get(pk=running.pk)
    assert job.status == FineTuningJob.SUCCEEDED and job.fine_tuned_model == job.fine_tuned_model_id
    assert ModelCard.objects.filter(model_id=job.fine_tuned_model_id).exists()
    assert Notification.objects.filter(user=job.owner).count() == 1


def test_worker_ids_name_the_process(alice, monkeypatch):
    seen = []
    monkeypatch.setattr(transitions, "start", lambda job, worker: seen.append(worker) or False)
    dataset = make_dataset(alice, format="chat", examples=8)
    job = FineTuningJob.objects.create(
        owner=alice, base_model=BASE, training_file=dataset, training_file_ref=dataset.public_id
    )

    services.job_run(job_id=job.pk, worker="host:celery@host")

    # Two worker processes started with the same node name on one host stay two workers.
    assert seen == [f"host:celery@host:{os.getpid()}"]
