"""Two machines on one host: each with its own FT_HOME and its own processes, sharing PostgreSQL, Redis and
the artifacts, in either of the two ways README's "Several machines" offers:

- "shared folder": one FT_SHARED_DIR for both, standing in for a mount every machine has at the same path;
- "bucket": an S3-compatible bucket (moto's server) behind FT_STORE, each machine with its own cache folder.

Machine A runs everything but training (FT_ROLES); machine B runs only a training worker. A job is
trained by B's worker, deployed on A's serving side, and chatted with through A's web.
"""

import time
from contextlib import contextmanager

import boto3
import pytest

from llm.bundled import TINY_MODEL_ID

from .live import chat_lines, fresh_postgres_database, postgres_up, s3_server, start_stack, stop_stack, wait_finished

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]
REDIS = "redis://127.0.0.1:6379/8"
A_ROLES = "web,eval,default,notify,housekeeping,serve,beat"
BUCKET = "ft-two-machines"


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(params=["shared folder", "bucket"])
def machines(request, tmp_path, tiny_model_dir, monkeypatch):
    """(a, b, a's artifact folder, b's artifact folder, the bucket or None)."""
    if not (postgres_up() and redis_up()):
        pytest.skip("PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 are needed for this test")
    import redis

    with fresh_postgres_database("ft_two_machines") as database_url, _artifacts(request.param, tmp_path) as where:
        store_env, a_shared, b_shared, bucket = where
        for name, value in store_env.items():  # this process reaches the bucket as the machines do
            monkeypatch.setenv(name, value)
        if bucket is not None:
            boto3.client("s3").create_bucket(Bucket=bucket)
        redis.Redis.from_url(REDIS).flushdb()
        common = {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS,
            "SECRET_KEY": "the-same-secret-on-every-machine-of-this-test",
            **store_env,
        }
        # B first: A's health counts the workers of every queue across machines, training's among them.
        b_env = {**common, "FT_ROLES": "train", "FT_SHARED_DIR": str(b_shared)}
        b = start_stack(tmp_path / "b", {TINY_MODEL_ID: tiny_model_dir}, env=b_env)
        try:
            a_env = {**common, "FT_ROLES": A_ROLES, "FT_SHARED_DIR": str(a_shared)}
            a = start_stack(tmp_path / "a", {TINY_MODEL_ID: tiny_model_dir}, env=a_env)
        except BaseException:
            stop_stack(b)
            raise
        yield a, b, a_shared, b_shared, bucket
        stop_stack(b)
        stop_stack(a)
        redis.Redis.from_url(REDIS).flushdb()


@contextmanager
def _artifacts(layout: str, tmp_path):
    """(environment both machines get, A's FT_SHARED_DIR, B's FT_SHARED_DIR, bucket name or None)."""
    if layout == "shared folder":
        shared = tmp_path / "shared"
        shared.mkdir()
        yield {}, shared, shared, None
        return
    with s3_server() as env:
        yield {**env, "FT_STORE": f"s3://{BUCKET}/console"}, tmp_path / "a-cache", tmp_path / "b-cache", BUCKET


def test_b_trains_what_a_deploys_and_serves(machines):
    a, b, a_shared, b_shared, bucket = machines
    assert "program:worker-train" not in (a.home / "run" / "supervisord.conf").read_text()
    assert [line.split()[0] for line in b.supervisorctl("status").strip().splitlines()] == ["worker-train"]
    key = a.api_key("alice")
    client = a.sdk(key)

    uploaded = client.files.create(file=("t.jsonl", chat_lines(8)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=uploaded.id, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    job = wait_finished(client, job.id, timeout=300)
    assert job.status == "succeeded", job.error

    # B's worker took it (A has none), and everything it wrote is in the shared folder, none in either home.
    assert "jobs_app.tasks.train_job" in b.log("worker-train")
    worker = a.manage(
        "shell",
        "-c",
        f"from jobs_app.models import FineTuningJob as J; print(J.objects.get(public_id='{job.id}').worker)",
    )
    assert f":train-{b.port}@" in worker.stdout.strip()  # "<host>:<celery worker name>"
    adapter = f"artifacts/jobs/{job.id}/adapter/adapter_config.json"
    assert (b_shared / adapter).is_file()
    assert not [found for home in (a.home, b.home) for found in home.rglob("adapter_config.json")]
    if bucket is not None:
        # B wrote it into its own cache and published it; the upload went the other way, A to B.
        stored = _keys(bucket)
        assert f"console/{adapter}" in stored
        assert any(key.startswith(f"console/artifacts/jobs/{job.id}/checkpoints/") for key in stored)
        assert any(key.startswith("console/media/datasets/") for key in stored)
        assert not (a_shared / adapter).exists()
        assert list((b_shared / "media" / "datasets").rglob("*.jsonl")), "B trained on a fetched copy of the upload"

    with a.rest(key) as rest:
        deployment = rest.post("/api/deployments", json={"model": job.fine_tuned_model}).json()
        try:
            deadline = time.monotonic() + 300
            while (body := rest.get(f"/api/deployments/{deployment['id']}").json())["status"] != "running":
                assert body["status"] == "deploying" and time.monotonic() < deadline, body
                time.sleep(1)
            assert f":serve-{a.port}@" in body["instance_list"][0]["worker"]
            answer = client.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert answer.usage.completion_tokens > 0 and answer.model == job.fine_tuned_model
            assert (a_shared / adapter).is_file(), "A's instance serves the adapter from its own copy"
            deadline = time.monotonic() + 30
            while rest.get(f"/api/deployments/{deployment['id']}").json()["requests_served"] < 1:
                assert time.monotonic() < deadline, "the deployment never counted the request"
                time.sleep(1)
        finally:
            assert rest.delete(f"/api/deployments/{deployment['id']}").json()["status"] == "cancelled"

    if bucket is not None:
        # Deleting the model on A removes it from the bucket too, whichever machine wrote it.
        a.sdk(key).models.delete(job.fine_tuned_model)
        deadline = time.monotonic() + 30
        while any(k.startswith(f"console/artifacts/jobs/{job.id}/adapter/") for k in _keys(bucket)):
            assert time.monotonic() < deadline, "the deleted model's files stayed in the bucket"
            time.sleep(0.5)


def _keys(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", ())]
