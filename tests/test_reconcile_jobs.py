"""Lost work is found again: a job left queued (or holding out data) whose task message the broker lost is
sent again by the periodic sweep, and runs; a job a worker has claimed, or whose message still waits, is not.

Uses a real Redis on 127.0.0.1:6379 as the Celery broker (skipped without one).
"""

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from finetune_site import broker
from finetune_site.celery import app
from jobs_app import services, transitions
from jobs_app.models import FineTuningJob, JobEvent
from jobs_app.tasks import prepare_holdout, train_job

from .test_checkpoint_recovery import chat_file  # noqa: F401 - a validated chat file of alice's
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lost_job(alice, chat_file, monkeypatch):
    """A job saved queued two minutes ago whose message never reached the broker."""
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    job = services.job_create(
        owner=alice, model=BASE, training_file=chat_file.public_id, hyperparameters={"batch_size": 4, "n_epochs": 1}
    )
    FineTuningJob.objects.filter(pk=job.pk).update(queued_at=timezone.now() - timedelta(minutes=2))
    return job


def waiting_messages(client, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_it_sends_a_lost_queued_job_again_once_and_the_job_then_runs(broker_redis, lost_job):
    assert services.requeue_lost_jobs() == [lost_job.public_id]
    # Its message now waits in the training queue: the next sweeps send no copies.
    assert services.requeue_lost_jobs() == []
    messages = waiting_messages(broker_redis, "training")
    assert [m["headers"]["task"] for m in messages] == ["jobs_app.tasks.train_job"]
    assert broker.waiting_task_args("jobs_app.tasks.train_job") == [[lost_job.pk]]

    # What a training worker does with that message.
    train_job.apply(args=broker.waiting_task_args("jobs_app.tasks.train_job")[0])

    job = FineTuningJob.objects.get(pk=lost_job.pk)
    assert job.status == FineTuningJob.SUCCEEDED and job.attempts == 1
    steps = list(job.events.filter(type=JobEvent.METRICS).values_list("step", flat=True))
    assert steps and sorted(steps) == list(range(1, job.total_steps + 1))  # each step once


def test_it_leaves_a_claimed_job_alone_and_a_copy_of_its_message_does_nothing(broker_redis, lost_job):
    assert transitions.start(lost_job, worker="w1")

    assert services.requeue_lost_jobs() == []
    assert waiting_messages(broker_redis, "training") == []

    train_job.apply(args=[lost_job.pk])  # a stray copy reaches a worker
    job = FineTuningJob.objects.get(pk=lost_job.pk)
    assert (job.status, job.worker, job.attempts) == (FineTuningJob.RUNNING, "w1", 1)
    assert not job.events.filter(message__startswith="Training started").exists()


def test_it_leaves_a_job_whose_message_still_waits_and_a_job_just_queued(broker_redis, lost_job, alice, chat_file):
    broker.send_task(train_job, lost_job.pk)  # waiting behind a long job, say
    fresh = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id)

    assert services.requeue_lost_jobs() == []
    assert broker.waiting_task_args("jobs_app.tasks.train_job") == [[lost_job.pk]]
    assert FineTuningJob.objects.get(pk=fresh.pk).status == FineTuningJob.QUEUED


def test_it_sends_a_lost_hold_out_again(broker_redis, lost_job):
    FineTuningJob.objects.filter(pk=lost_job.pk).update(
        status=FineTuningJob.VALIDATING, holdout_percent=20, queued_at=timezone.now() - timedelta(minutes=11)
    )

    assert services.requeue_lost_jobs() == [lost_job.public_id]
    assert broker.waiting_task_args(prepare_holdout.name) == [[lost_job.pk, 20]]
    assert services.requeue_lost_jobs() == []


def test_the_periodic_sweep_includes_it(broker_redis, lost_job):
    from jobs_app.tasks import recover_stale_jobs

    assert recover_stale_jobs.apply().get() == [lost_job.public_id]


def test_a_hold_out_sent_twice_keeps_one_pair_of_parts(lost_job, chat_file, monkeypatch):
    """A second hold-out that starts while the first still splits (as a message sent again may) loses
    to the first, and takes its own parts away: the job keeps one train and one validation file."""
    from datasets_app import services as dataset_services
    from datasets_app.models import Dataset

    FineTuningJob.objects.filter(pk=lost_job.pk).update(status=FineTuningJob.VALIDATING, holdout_percent=20)
    real_split = dataset_services.dataset_split
    nested = []

    def split_then_let_the_other_finish(**kwargs):
        parts = real_split(**kwargs)
        if not nested:  # the first hold-out's split is done; the copy runs whole before it goes on
            nested.append(True)
            services.job_prepare_holdout(job_id=lost_job.pk, percent=20)
        return parts

    monkeypatch.setattr(dataset_services, "dataset_split", split_then_let_the_other_finish)
    services.job_prepare_holdout(job_id=lost_job.pk, percent=20)

    job = FineTuningJob.objects.get(pk=lost_job.pk)
    assert job.status == FineTuningJob.QUEUED
    assert set(Dataset.objects.values_list("pk", flat=True)) == {
        chat_file.pk,
        job.training_file_id,
        job.validation_file_id,
    }


def test_a_message_a_worker_has_reserved_but_not_begun_counts_as_waiting(broker_redis, lost_job):
    """A prefork worker prefetches: the message leaves the queue's list for kombu's unacked hash until the
    task starts. The sweep must not send a copy of it."""
    broker.send_task(train_job, lost_job.pk)
    with app.connection_for_read() as connection:
        reserved = connection.SimpleQueue("training", no_ack=False).get(timeout=5)  # taken, not acknowledged
        assert waiting_messages(broker_redis, "training") == []

        assert broker.waiting_task_args(train_job.name) == [[lost_job.pk]]
        assert services.requeue_lost_jobs() == []

        reserved.ack()  # the task starts
    assert broker.waiting_task_args(train_job.name) == []


def test_a_message_reserved_long_ago_by_a_worker_that_never_began_it_counts_as_lost(broker_redis, lost_job):
    """A worker killed holding a prefetched message leaves it in kombu's unacked hash for an hour."""
    broker.send_task(train_job, lost_job.pk)
    with app.connection_for_read() as connection:
        connection.SimpleQueue("training", no_ack=False).get(timeout=5)  # taken; the worker then dies
        channel = connection.default_channel
        (tag,) = channel.client.zrange(channel.unacked_index_key, 0, -1)
        channel.client.zadd(channel.unacked_index_key, {tag: time.time() - 3600})  # it took it an hour ago

        assert broker.waiting_task_args(train_job.name, reserved_within=60) == []
        assert services.requeue_lost_jobs() == [lost_job.public_id]
