"""Two machines on one host: each with its own FT_HOME and its own processes, sharing PostgreSQL, Redis and
the artifact folder (FT_SHARED_DIR, standing in for a mount every machine has at the same path).

Machine A runs everything but training (FT_ROLES); machine B runs only a training worker. A job is
trained by B's worker, deployed on A's serving side, and chatted with through A's web.
"""

import time

import pytest

from llm.bundled import TINY_MODEL_ID

from .live import chat_lines, fresh_postgres_database, postgres_up, start_stack, stop_stack, wait_finished

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]
REDIS = "redis://127.0.0.1:6379/8"
A_ROLES = "web,eval,default,notify,housekeeping,serve,beat"


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def machines(tmp_path, tiny_model_dir):
    if not (postgres_up() and redis_up()):
        pytest.skip("PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 are needed for this test")
    import redis

    shared = tmp_path / "shared"
    shared.mkdir()
    with fresh_postgres_database("ft_two_machines") as database_url:
        redis.Redis.from_url(REDIS).flushdb()
        common = {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS,
            "FT_SHARED_DIR": str(shared),
            "SECRET_KEY": "the-same-secret-on-every-machine-of-this-test",
        }
        # B first: A's health counts the workers of every queue across machines, training's among them.
        b = start_stack(tmp_path / "b", {TINY_MODEL_ID: tiny_model_dir}, env={**common, "FT_ROLES": "train"})
        try:
            a = start_stack(tmp_path / "a", {TINY_MODEL_ID: tiny_model_dir}, env={**common, "FT_ROLES": A_ROLES})
        except BaseException:
            stop_stack(b)
            raise
        yield a, b, shared
        stop_stack(b)
        stop_stack(a)
        redis.Redis.from_url(REDIS).flushdb()


def test_b_trains_what_a_deploys_and_serves(machines):
    a, b, shared = machines
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
    assert (shared / "artifacts" / "jobs" / job.id / "adapter" / "adapter_config.json").is_file()
    assert not [found for home in (a.home, b.home) for found in home.rglob("adapter_config.json")]

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
            deadline = time.monotonic() + 30
            while rest.get(f"/api/deployments/{deployment['id']}").json()["requests_served"] < 1:
                assert time.monotonic() < deadline, "the deployment never counted the request"
                time.sleep(1)
        finally:
            assert rest.delete(f"/api/deployments/{deployment['id']}").json()["status"] == "cancelled"
