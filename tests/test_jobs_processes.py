"""A job that asks for several training processes: the API checks and echoes it, and the worker trains it
with torchrun ranks (DDP on CPU, gloo) that follow the one-process curve.

The engine's own 2-process tests are in tests/train/test_distributed.py; here the job goes through
`services.job_run`, as the training worker runs it, with the real engine and the tiny model.
"""

import pytest

from finetune_site.models import ApiKey
from jobs_app import services
from jobs_app.models import FineTuningJob

from .test_api_auth import auth
from .test_checkpoint_recovery import chat_file  # noqa: F401 - a processed chat file of 8 examples
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key(alice):
    return ApiKey.issue(alice, name="test")[1]


@pytest.mark.parametrize("processes", [0, "two", True, 1.5, 99])
def test_a_bad_process_count_is_a_400_naming_it(client, key, chat_file, settings, processes):
    settings.FT_TRAIN_MAX_PROCESSES = 4
    body = {"model": BASE, "training_file": chat_file.public_id, "processes": processes}

    response = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **auth(key))

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "processes"
    assert not FineTuningJob.objects.exists()


def test_the_job_object_says_how_many_processes_train_it(client, key, chat_file, settings, monkeypatch):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    settings.FT_TRAIN_PROCESSES, settings.FT_TRAIN_MAX_PROCESSES = 1, 2
    body = {"model": BASE, "training_file": chat_file.public_id}

    default = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **auth(key)).json()
    asked = client.post(
        "/api/paas/v4/fine_tuning/jobs", {**body, "processes": 2}, content_type="application/json", **auth(key)
    ).json()

    assert default["processes"] == 1 and asked["processes"] == 2
    assert FineTuningJob.objects.get(public_id=asked["id"]).processes == 2


def test_a_two_process_job_trains_on_the_one_process_curve(alice, chat_file, monkeypatch, settings):
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings.FT_TRAIN_MAX_PROCESSES = 2

    def run(processes: int) -> FineTuningJob:
        job = services.job_create(
            owner=alice,
            model=BASE,
            training_file=chat_file.public_id,
            hyperparameters={"batch_size": 4, "n_epochs": 2, "learning_rate_multiplier": 10},
            seed=3,
            processes=processes,
        )
        services.job_run(job_id=job.pk, worker="test")
        job.refresh_from_db()
        return job

    one, two = run(1), run(2)

    def losses(job):
        return [(e.step, e.data["train_loss"]) for e in job.events.filter(type="metrics").order_by("step")]

    assert one.status == two.status == FineTuningJob.SUCCEEDED, two.error
    assert [step for step, _ in losses(two)] == [step for step, _ in losses(one)] == [1, 2, 3, 4]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(losses(one), losses(two), strict=True))
    assert two.fine_tuned_model and (two.output_dir / "adapter" / "adapter_config.json").exists()


def test_a_two_process_job_asks_the_owners_quota_before_each_checkpoint(alice, chat_file, monkeypatch, settings):
    """The ranks cannot see the quota (a database query in the worker): rank 0 asks the launcher through files."""
    from finetune_site import quotas

    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings.FT_TRAIN_MAX_PROCESSES = 2
    # As in test_storage_quotas: the first checkpoint (about 400 KB) fits, the second does not.
    settings.FT_STORAGE_QUOTA_BYTES = 640_000
    job = services.job_create(
        owner=alice,
        model=BASE,
        training_file=chat_file.public_id,
        hyperparameters={"batch_size": 4, "n_epochs": 2, "learning_rate_multiplier": 10},
        processes=2,
    )

    services.job_run(job_id=job.pk, worker="test")
    job.refresh_from_db()

    assert job.status == FineTuningJob.FAILED and job.error["code"] == "disk_full", job.error
    assert job.error["message"].startswith("No room for the checkpoint at step 4: it needs about ")
    assert list(job.checkpoints.values_list("step", flat=True)) == [2]
    assert quotas.storage_used(alice) <= settings.FT_STORAGE_QUOTA_BYTES
