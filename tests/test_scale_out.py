"""Scale-out: PostgreSQL and an external Redis, with a second training worker joining like another machine."""

import subprocess
import sys
import time

import openai
import pytest

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID

from .live import REPO, chat_lines, fresh_postgres_database, postgres_up, start_stack, stop_stack

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]
REDIS = "redis://127.0.0.1:6379/7"


def _redis_up() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def scale_out_stack(tmp_path, tiny_model_dir, bundled_model_dir, monkeypatch):
    if not (postgres_up() and _redis_up()):
        pytest.skip("PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 are needed for this test")
    import redis

    with fresh_postgres_database("ft_test") as database_url:
        redis.Redis.from_url(REDIS).flushdb()
        monkeypatch.setenv("DATABASE_URL", database_url)
        monkeypatch.setenv("REDIS_URL", REDIS)
        stack = start_stack(
            tmp_path / "home", {TINY_MODEL_ID: tiny_model_dir, BUNDLED_MODEL_ID: bundled_model_dir}, keep_env=True
        )
        # A second training worker, as if on another machine: same database, Redis and shared
        # artifact storage (FT_HOME stands in for the shared mount).
        second = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "finetune_site",
                "worker",
                "-Q",
                "training",
                "--pool",
                "threads",
                "--concurrency",
                "1",
                "-n",
                "train-other@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=REPO,
            env=dict(stack.env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield stack
        second.terminate()
        second.wait(timeout=60)
        stop_stack(stack)
        redis.Redis.from_url(REDIS).flushdb()


def test_two_workers_train_two_jobs_at_once_on_postgres(scale_out_stack):
    stack = scale_out_stack
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("alice"), max_retries=0)
    uploaded = client.files.create(file=("t.jsonl", chat_lines(60)), purpose="fine-tune")
    client.files.wait_for_processing(uploaded.id, poll_interval=0.5)
    jobs = [
        client.fine_tuning.jobs.create(
            model=TINY_MODEL_ID, training_file=uploaded.id, hyperparameters={"n_epochs": 2, "batch_size": 1}
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 300
    both_running = False
    while time.monotonic() < deadline:
        states = [client.fine_tuning.jobs.retrieve(j.id).status for j in jobs]
        both_running = both_running or states == ["running", "running"]
        if all(s in ("succeeded", "failed") for s in states):
            break
        time.sleep(0.3)
    assert states == ["succeeded", "succeeded"], [client.fine_tuning.jobs.retrieve(j.id).error for j in jobs]
    assert both_running, "the second worker never took the second job"
    workers = stack.manage(
        "shell",
        "-c",
        "from jobs_app.models import FineTuningJob as J; print(sorted(set(J.objects.values_list('worker', flat=True))))",
    ).stdout
    assert "train-other@" in workers and f"train-{stack.port}@" in workers
