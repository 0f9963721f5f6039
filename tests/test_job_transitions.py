"""The job state machine: every transition from every status, its guards, and who may win a race."""

import ast
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.forms.models import model_to_dict
from django.utils import timezone

from datasets_app.models import Dataset
from finetune_site.errors import InvalidState
from jobs_app import services, transitions
from jobs_app.hyperparameters import resolve_hyperparameters
from jobs_app.models import FineTuningJob, JobEvent

from .live import REPO

pytestmark = pytest.mark.django_db

STATUSES = [status for status, _ in FineTuningJob.STATUS_CHOICES]

# Written out here rather than read from transitions.TRANSITIONS, so a change to the table has to be
# made twice: {transition: {the status it may leave: the status it leaves the job in}}.
ALLOWED = {
    "validated": {"validating_files": "queued"},
    "start": {"queued": "running"},
    "request_pause": {"running": "running"},
    "request_cancel": {"running": "running"},
    "pause": {"running": "paused"},
    "resume": {"paused": "queued"},
    "cancel": {"validating_files": "cancelled", "queued": "cancelled", "paused": "cancelled"},
    "stop": {"running": "cancelled"},
    "finish": {"running": "succeeded"},
    "reject": {"validating_files": "failed"},
    "fail": {"running": "failed"},
    "requeue": {"running": "queued"},
    "retry": {"failed": "queued", "cancelled": "queued"},
}

ERROR = {"code": "x", "message": "boom", "param": None}


def _file(owner, name: str) -> Dataset:
    dataset = Dataset(owner=owner, filename=name, bytes=4, status=Dataset.PROCESSED, examples=4)
    dataset.file.save(name, SimpleUploadedFile(name, b"{}\n"), save=True)
    return dataset


def _apply(name: str, job: FineTuningJob, *, worker: str = "w1") -> bool:
    """Call transition `name` as its one caller does, for the worker `worker`."""
    soon = timezone.now() + timedelta(seconds=1)  # every heartbeat in these tests is older
    calls = {
        "validated": lambda: transitions.validated(
            job, training_file=_file(job.owner, "t.jsonl"), validation_file=_file(job.owner, "v.jsonl"), resolved={}
        ),
        "start": lambda: transitions.start(job, worker=worker),
        "request_pause": lambda: transitions.request_pause(job),
        "request_cancel": lambda: transitions.request_cancel(job),
        "pause": lambda: transitions.pause(job, worker=worker),
        "resume": lambda: transitions.resume(job),
        "cancel": lambda: transitions.cancel(job),
        "stop": lambda: transitions.stop(job, worker=worker),
        "finish": lambda: transitions.finish(job, worker=worker, fine_tuned_model="ft:m", trained_tokens=10, step=3),
        "reject": lambda: transitions.reject(job, error=ERROR),
        "fail": lambda: transitions.fail(job, error=ERROR, worker=worker),
        "requeue": lambda: transitions.requeue(job, stale_before=soon),
        "retry": lambda: transitions.retry(job),
    }
    return calls[name]()


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


@pytest.fixture
def make_job(alice, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"

    def make(status: str, **fields) -> FineTuningJob:
        defaults = dict(
            owner=alice,
            base_model="tiny-random-smollm2",
            training_file_ref="file-x",
            status=status,
            worker="w1",
            heartbeat_at=timezone.now() - timedelta(minutes=5),
            resolved=resolve_hyperparameters({}, method="lora", examples=40),
        )
        return FineTuningJob.objects.create(**{**defaults, **fields})

    return make


def _row(job: FineTuningJob) -> dict:
    return model_to_dict(FineTuningJob.objects.get(pk=job.pk))


def test_the_table_lists_every_transition_and_only_known_states():
    assert set(transitions.TRANSITIONS) == set(ALLOWED)
    for name, (leaves, enters) in transitions.TRANSITIONS.items():
        assert set(leaves) == set(ALLOWED[name]), name
        assert enters in (None, *STATUSES), name


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_each_transition_moves_only_from_the_states_it_names(make_job, name, status):
    job = make_job(status)
    before = _row(job)
    won = _apply(name, job)
    after = _row(job)
    if status in ALLOWED[name]:
        assert won is True
        assert after["status"] == ALLOWED[name][status]
        assert after != before
    else:
        assert won is False
        assert after == before  # a refused move writes nothing at all


def test_each_transition_writes_what_its_state_needs(make_job):
    running = make_job("running", control="cancel", estimated_finish=timezone.now())
    transitions.stop(running, worker="w1")
    running.refresh_from_db()
    assert running.control == "" and running.finished_at and running.estimated_finish is None

    asked = make_job("running")
    transitions.request_pause(asked)
    asked.refresh_from_db()
    assert asked.status == "running" and asked.control == "pause"

    queued = make_job("queued", attempts=1, worker="")
    assert transitions.start(queued, worker="w9")
    # start refreshes the job in hand: the worker goes on with the row it claimed.
    assert queued.status == "running" and queued.worker == "w9" and queued.attempts == 2 and queued.started_at

    failed = make_job("failed", error=ERROR, attempts=3, finished_at=timezone.now())
    transitions.retry(failed)
    failed.refresh_from_db()
    assert failed.error is None and failed.attempts == 0 and failed.finished_at is None

    lost = make_job("running", worker="w1")
    transitions.fail(lost, error=ERROR, stale_before=timezone.now())
    lost.refresh_from_db()
    assert lost.status == "failed" and lost.worker == "" and lost.error == ERROR


@pytest.mark.parametrize("name", ["pause", "stop", "finish", "fail"])
def test_a_worker_that_no_longer_holds_the_job_cannot_end_it(make_job, name):
    # The heartbeat lapsed, the job was re-queued and w2 claimed it; w1 wakes up and ends "its" run.
    job = make_job("running", worker="w2")
    before = _row(job)
    assert _apply(name, job, worker="w1") is False
    assert _row(job) == before


@pytest.mark.parametrize("name", ["requeue", "fail"])
def test_a_job_whose_worker_still_beats_is_neither_requeued_nor_failed_as_lost(make_job, name):
    job = make_job("running", heartbeat_at=timezone.now())
    cutoff = timezone.now() - timedelta(minutes=1)
    if name == "requeue":
        assert transitions.requeue(job, stale_before=cutoff) is False
    else:
        assert transitions.fail(job, error=ERROR, stale_before=cutoff) is False
    assert _row(job)["status"] == "running"


def test_a_late_hold_out_failure_cannot_fail_a_job_that_already_runs(make_job):
    # A duplicate prepare_holdout message arrives after the first copy queued the job and a worker took it.
    job = make_job("running", worker="w1")
    before = _row(job)
    assert transitions.reject(job, error=ERROR) is False
    assert _row(job) == before
    with pytest.raises(ValueError, match="exactly one"):
        transitions.fail(job, error=ERROR)


def test_two_claimers_of_one_job_cannot_both_start_it(make_job):
    job = make_job("queued", worker="")
    seen_by_first, seen_by_second = FineTuningJob.objects.get(pk=job.pk), FineTuningJob.objects.get(pk=job.pk)
    # Both read the job while it was queued; the conditional update lets only the first through.
    assert transitions.start(seen_by_first, worker="w1") is True
    assert transitions.start(seen_by_second, worker="w2") is False
    job.refresh_from_db()
    assert job.worker == "w1" and job.attempts == 1


@pytest.mark.django_db(False)
def test_eight_workers_claiming_at_once_start_the_job_exactly_once(database_url, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "FT_HOME": str(tmp_path / "home"),
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DJANGO_SETTINGS_MODULE": "finetune_site.settings",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.races.claim"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["winners"]) == 1, result
    assert result["status"] == "running" and result["worker"] == result["winners"][0] and result["attempts"] == 1


@pytest.mark.parametrize(
    "action, status",
    [
        (services.job_cancel, "succeeded"),
        (services.job_pause, "queued"),
        (services.job_resume, "running"),
        (services.job_retry, "succeeded"),
    ],
)
def test_a_user_asking_for_a_move_the_job_cannot_make_gets_invalid_state(make_job, action, status):
    job = make_job(status)
    before = _row(job)
    with pytest.raises(InvalidState) as refused:
        action(job=job)
    assert refused.value.code == "invalid_state" and job.public_id in refused.value.message
    assert _row(job) == before


def test_a_refused_button_brings_the_user_back_to_the_job_page_with_the_reason(client, make_job):
    job = make_job("succeeded")
    page = f"http://testserver/jobs/{job.public_id}/"
    response = client.post(f"/jobs/{job.public_id}/pause/", HTTP_REFERER=page)
    assert response.status_code == 302 and response["Location"] == page
    shown = client.get("/jobs/").content.decode()  # the next page shown carries the message
    assert f"Only a running job can be paused; {job.public_id} is succeeded." in shown


def test_the_api_answers_a_refused_move_with_400_invalid_state(client, make_job):
    job = make_job("succeeded")
    response = client.post(f"/v1/fine_tuning/jobs/{job.public_id}/pause")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_state"


def test_a_run_that_ends_after_losing_its_job_tells_nobody(make_job):
    job = make_job("running", worker="w1")
    from jobs_app.sink import JobSink

    FineTuningJob.objects.filter(pk=job.pk).update(worker="w2")  # re-queued and claimed meanwhile
    services._finish_run(job, None, ERROR, JobSink(job))
    job.refresh_from_db()
    assert job.status == "running" and job.worker == "w2" and job.error is None
    assert not JobEvent.objects.filter(job=job, message__startswith="Training failed").exists()


def _job_status_writes(path: Path, *, only_jobs: bool) -> list[str]:
    """Places in one file that set a status with `.update(status=...)` or `x.status = ...`.

    In jobs_app every status is a job's; elsewhere only the writes that name a job count.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update":
            if any(k.arg == "status" for k in node.keywords):
                found.append((ast.unparse(node.func.value), f"{path}:{node.lineno}"))
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "status":
                    found.append((ast.unparse(target.value), f"{path}:{node.lineno}"))
    return [place for receiver, place in found if not only_jobs or "job" in receiver.lower()]


def test_no_code_but_the_state_machine_writes_a_job_status():
    apps = {"jobs_app": False, "deployments_app": True, "datasets_app": True, "finetune_site": True}
    places = [
        place
        for app, only_jobs in apps.items()
        for path in (REPO / app).rglob("*.py")
        if "migrations" not in path.parts and path != REPO / "jobs_app" / "transitions.py"
        for place in _job_status_writes(path, only_jobs=only_jobs)
    ]
    assert places == []
