"""A job whose training processes span several machines: the API checks and echoes `nodes` and `rendezvous`,
the claiming worker (node 0) asks the others to join and gives up on them after FT_TRAIN_JOIN_TIMEOUT, and a
joining worker runs only for the attempt that asked for it.

These run without a stack: the worker's code through `services.job_run` and `services.job_join`. Two machines
training together, through torchrun and through two stacks, are in tests/test_training_across_machines.py.
"""

import os
import subprocess
import sys

import pytest

from finetune_site.models import ApiKey
from jobs_app import services
from jobs_app.models import FineTuningJob

from .live import free_port
from .test_api_auth import auth
from .test_checkpoint_recovery import chat_file  # noqa: F401 - a processed chat file of 8 examples
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def key(alice):
    return ApiKey.issue(alice, name="test")[1]


@pytest.fixture
def sent(monkeypatch) -> list[tuple]:
    """The join tasks node 0 sends, kept here instead of reaching a broker; train_job is not sent either."""
    joins: list[tuple] = []
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    monkeypatch.setattr("jobs_app.tasks.join_job.delay", lambda *args: joins.append(args))
    return joins


def create(client, key, body: dict):
    return client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **auth(key))


@pytest.mark.parametrize("nodes", [0, "two", True, 1.5, 9])
def test_a_bad_machine_count_is_a_400_naming_nodes(client, key, chat_file, settings, nodes):
    settings.FT_TRAIN_MAX_NODES, settings.FT_TRAIN_RENDEZVOUS = 8, "127.0.0.1:29400"

    response = create(client, key, {"model": BASE, "training_file": chat_file.public_id, "nodes": nodes})

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "nodes"
    assert not FineTuningJob.objects.exists()


def test_several_machines_without_a_meeting_address_is_a_400_that_says_how_to_give_one(
    client, key, chat_file, settings
):
    settings.FT_TRAIN_RENDEZVOUS = ""

    response = create(client, key, {"model": BASE, "training_file": chat_file.public_id, "nodes": 2})

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "rendezvous"
    assert "2 machines" in error["message"] and "FT_TRAIN_RENDEZVOUS" in error["message"]
    assert not FineTuningJob.objects.exists()


@pytest.mark.parametrize(
    "rendezvous", ["node-a", "node-a:0", "node-a:65536", ":29400", "node-a:port", "node a:29400", 29400]
)
def test_a_rendezvous_that_is_not_host_and_port_is_a_400_naming_it(client, key, chat_file, rendezvous):
    body = {"model": BASE, "training_file": chat_file.public_id, "nodes": 2, "rendezvous": rendezvous}

    response = create(client, key, body)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "rendezvous"


def test_a_rendezvous_for_one_machine_is_a_400(client, key, chat_file):
    body = {"model": BASE, "training_file": chat_file.public_id, "rendezvous": "node-a:29400"}

    response = create(client, key, body)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "rendezvous"


def test_the_job_object_says_how_many_machines_train_it_and_where_they_meet(client, key, chat_file, settings, sent):
    settings.FT_TRAIN_RENDEZVOUS = "10.0.0.5:29400"
    body = {"model": BASE, "training_file": chat_file.public_id}

    one = create(client, key, body).json()
    by_setting = create(client, key, {**body, "nodes": 2, "processes": 1}).json()
    own = client.post(
        "/api/paas/v4/fine_tuning/jobs",
        {**body, "nodes": 3, "rendezvous": " node-b.internal:29500 "},
        content_type="application/json",
        **auth(key),
    ).json()

    assert (one["nodes"], one["rendezvous"]) == (1, None)
    assert (by_setting["nodes"], by_setting["rendezvous"]) == (2, None)  # the claiming worker's FT_TRAIN_RENDEZVOUS
    assert (own["nodes"], own["rendezvous"]) == (3, "node-b.internal:29500")
    assert FineTuningJob.objects.get(public_id=own["id"]).nodes == 3
    assert client.get(f"/v1/fine_tuning/jobs/{own['id']}", **auth(key)).json()["rendezvous"] == "node-b.internal:29500"


def test_a_meeting_address_that_is_not_host_and_port_stops_the_server_at_start():
    env = {**os.environ, "FT_TRAIN_RENDEZVOUS": "node-a", "DJANGO_SETTINGS_MODULE": "finetune_site.settings"}
    started = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=REPO, env=env, capture_output=True, text=True
    )

    assert started.returncode != 0
    assert "ImproperlyConfigured: FT_TRAIN_RENDEZVOUS must be host:port, got 'node-a'" in started.stderr


@pytest.mark.timeout(120)
def test_machines_that_never_join_fail_the_attempt_saying_how_many_came(alice, chat_file, settings, sent):
    """Node 0 waits FT_TRAIN_JOIN_TIMEOUT at the rendezvous, then gives up: nothing trains on half the machines."""
    rendezvous = f"127.0.0.1:{free_port()}"
    settings.FT_TRAIN_RENDEZVOUS, settings.FT_TRAIN_JOIN_TIMEOUT = rendezvous, 3
    job = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id, nodes=2)

    services.job_run(job_id=job.pk, worker="node-a")
    job.refresh_from_db()

    assert sent == [(job.pk, 1, 1, rendezvous, None)]  # machine 2 was asked to join attempt 1, from the start
    assert job.status == FineTuningJob.FAILED, job.error
    assert job.error["code"] == "training_failed"
    assert job.error["message"].startswith(f"Only 1 of 2 machines joined the rendezvous at {rendezvous} within 3 s.")
    assert "FT_TRAIN_JOIN_TIMEOUT" in job.error["message"]
    assert not job.events.filter(type="metrics").exists()


def test_a_meeting_address_of_another_machine_fails_the_attempt_before_anyone_is_asked_to_join(
    alice, chat_file, settings, sent
):
    """The claiming worker hosts the rendezvous: another machine's address would leave every machine waiting."""
    job = services.job_create(
        owner=alice, model=BASE, training_file=chat_file.public_id, nodes=2, rendezvous="192.0.2.1:29400"
    )

    services.job_run(job_id=job.pk, worker="node-a")
    job.refresh_from_db()

    assert job.status == FineTuningJob.FAILED and job.error["code"] == "invalid_config", job.error
    assert "192.0.2.1:29400 is not an address of" in job.error["message"]
    assert sent == []


def test_a_machine_asked_to_join_an_attempt_that_has_ended_starts_nothing(alice, chat_file, settings, monkeypatch):
    settings.FT_TRAIN_RENDEZVOUS = "127.0.0.1:29400"
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    started = []
    monkeypatch.setattr("llm.train.launch.join_processes", lambda *args, **kwargs: started.append(kwargs))
    job = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id, nodes=2)
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.RUNNING, attempts=2)

    services.job_join(job_id=job.pk, attempt=1, node_rank=1, rendezvous="127.0.0.1:29400", resume_step=None)
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.QUEUED)  # attempt 2's worker was lost
    services.job_join(job_id=job.pk, attempt=2, node_rank=1, rendezvous="127.0.0.1:29400", resume_step=None)

    assert started == []
    assert not job.events.filter(message__contains="joins").exists()


def test_a_joining_machine_runs_its_ranks_while_its_attempt_runs_and_says_so(alice, chat_file, settings, monkeypatch):
    settings.FT_TRAIN_RENDEZVOUS, settings.FT_TRAIN_MAX_PROCESSES = "127.0.0.1:29400", 2
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    calls, still_wanted = [], []

    def join_processes(config, **options):
        calls.append((config, options))
        still_wanted.append(options["keep_going"]())
        FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.PAUSED)  # node 0 paused the run
        still_wanted.append(options["keep_going"]())
        return False

    monkeypatch.setattr("llm.train.launch.join_processes", join_processes)
    job = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id, nodes=2, processes=2)
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.RUNNING, attempts=1)

    services.job_join(
        job_id=job.pk, attempt=1, node_rank=1, rendezvous="127.0.0.1:29400", resume_step=None, worker="node-b"
    )

    [(config, options)] = calls
    assert options["node_rank"] == 1 and options["nnodes"] == 2 and options["processes"] == 2
    assert options["rendezvous"] == "127.0.0.1:29400" and options["run_id"] == f"{job.public_id}-1"
    assert config.out_dir == str(job.output_dir) and config.resume_from is None
    assert still_wanted == [True, False]
    joined = job.events.get(message__contains="joins")
    assert joined.message.startswith("Machine 2 of 2 (node-b:") and "127.0.0.1:29400" in joined.message


def test_a_joining_machine_without_node_0s_checkpoint_says_so_and_trains_nothing(
    alice, chat_file, settings, monkeypatch
):
    """Starting afresh while node 0 resumes would train two different models: it stays out, node 0 times out."""
    settings.FT_TRAIN_RENDEZVOUS = "127.0.0.1:29400"
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    started = []
    monkeypatch.setattr("llm.train.launch.join_processes", lambda *args, **kwargs: started.append(kwargs))
    job = services.job_create(owner=alice, model=BASE, training_file=chat_file.public_id, nodes=2)
    FineTuningJob.objects.filter(pk=job.pk).update(status=FineTuningJob.RUNNING, attempts=2)

    services.job_join(
        job_id=job.pk, attempt=2, node_rank=1, rendezvous="127.0.0.1:29400", resume_step=4, worker="node-b"
    )

    assert started == []
    stopped = job.events.get(level="warn")
    assert stopped.message.startswith("Machine 2 of 2 (node-b:")
    assert stopped.message.endswith("stopped: resume_from: the checkpoint at step 4 that node 0 resumes from is gone")
