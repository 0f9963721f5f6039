"""One run's torchrun processes spread over two machines: they follow the one-process curve, only the first
machine's rank 0 reports and writes, and a job over two machines is trained by two training workers together.

The machines are two torchrun launches on 127.0.0.1 (gloo), then two stacks on one host sharing PostgreSQL,
Redis and the artifact folder as tests/test_two_machines.py's do. The API's checks, a machine that never joins
and the joining worker's own rules are in tests/test_jobs_nodes.py.
"""

import threading
import time

import pytest
import torch
from django.db import connection

from jobs_app import services
from jobs_app.models import FineTuningJob
from jobs_app.sink import JobSink, Watchdog
from llm.bundled import TINY_MODEL_ID
from llm.train import TrainConfig, train
from llm.train import checkpoint as ckpt
from llm.train.launch import TrainingProcessesFailed, join_processes, train_in_processes

from .live import chat_lines, free_port, fresh_postgres_database, postgres_up, start_stack, stop_stack, wait_finished
from .test_checkpoint_recovery import chat_file  # noqa: F401 - a processed chat file of 8 examples
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model
from .train.conftest import Recorder, chat_examples, write_jsonl
from .train.test_distributed import environment  # the ranks' environment: loopback gloo, one thread, a short timeout

TOLERANCE = 1e-4
"""Per step: the ranks sum the same terms in another order, nothing more."""
REDIS = "redis://127.0.0.1:6379/9"


@pytest.fixture
def options(tiny_model_dir, tmp_path) -> dict:
    """One epoch of three steps (5, 5 and 1 examples: one machine sits out the last), validated at the end."""
    return {
        "model": str(tiny_model_dir),
        "train_file": str(write_jsonl(tmp_path / "train.jsonl", chat_examples(11, seed=1))),
        "validation_file": str(write_jsonl(tmp_path / "validation.jsonl", chat_examples(3, seed=2))),
        "epochs": 1,
        "batch_size": 5,
        "lr": 1e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,  # dropout masks fall differently over two processes: no per-step match with it
        "warmup_ratio": 0.0,
        "keep_checkpoints": 0,
        "micro_batch_tokens": 96,  # several micro-batches a step: accumulation is part of what must match
        "device": "cpu",
    }


@pytest.mark.timeout(240)  # a rendezvous that never completes would otherwise hang for torch's 600 s
def test_two_machines_of_one_process_each_follow_the_one_process_curve(options, tmp_path):
    alone = Recorder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        train(TrainConfig(**options, out_dir=str(tmp_path / "alone")), sink=alone)
    finally:
        torch.set_num_threads(threads)
    rendezvous = f"127.0.0.1:{free_port()}"
    # Machine 2 gets a folder of its own: whatever its rank wrote would be there.
    second_out = tmp_path / "second-machine"
    joined: list[object] = []

    def second_machine() -> None:
        try:
            joined.append(
                join_processes(
                    TrainConfig(**options, out_dir=str(second_out)),
                    processes=1,
                    nnodes=2,
                    node_rank=1,
                    rendezvous=rendezvous,
                    run_id="across",
                    join_timeout_s=120,
                    env=environment(),
                )
            )
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            joined.append(exc)

    second = threading.Thread(target=second_machine)
    second.start()
    first = Recorder()
    out = tmp_path / "first-machine"
    try:
        summary = train_in_processes(
            TrainConfig(**options, out_dir=str(out)),
            processes=1,
            nnodes=2,
            rendezvous=rendezvous,
            run_id="across",
            join_timeout_s=120,
            sink=first,
            should_stop=first.should_stop,
            env=environment(),
        )
    finally:
        second.join(timeout=180)

    assert joined == [True]
    expected = {metric["step"]: metric["loss"] for metric in alone.of("metric")}
    metrics = first.of("metric")
    assert [metric["step"] for metric in metrics] == [1, 2, 3] == list(expected)  # rank 0 alone reports
    assert {metric["step"]: metric["loss"] for metric in metrics} == pytest.approx(expected, abs=TOLERANCE)
    assert [metric["tokens"] for metric in metrics] == [metric["tokens"] for metric in alone.of("metric")]
    assert [e["eval_loss"] for e in first.of("eval")] == pytest.approx(
        [e["eval_loss"] for e in alone.of("eval")], abs=TOLERANCE
    )
    assert any("2 processes (ddp)" in event["message"] for event in first.of("event"))
    assert summary["steps"] == 3 and summary["stopped"] is None and first.stop_asked > 0
    assert ckpt.checkpoint_steps(out) == [3] and (out / "adapter" / "adapter_model.safetensors").is_file()
    # Its rank spilled its tokens' temporary files there while reading data, and left nothing: no checkpoint,
    # metrics, config or adapter.
    assert list(second_out.rglob("*")) == []


@pytest.mark.timeout(240)
def test_the_second_machines_ranks_dying_mid_run_fail_the_first_machines_run_at_once(options, tmp_path):
    """Never half a run training: the first machine's next collective fails, and its torchrun with it."""
    options = {**options, "train_file": str(write_jsonl(tmp_path / "long.jsonl", chat_examples(400, seed=3)))}
    options |= {"batch_size": 1, "validation_file": None}  # hundreds of short steps: still going when it dies
    rendezvous = f"127.0.0.1:{free_port()}"
    first = Recorder()
    killed_at: list[float] = []

    def wanted() -> bool:  # "no" once the run is under way: join_processes ends the second machine's ranks
        if any(metric["step"] >= 2 for metric in first.of("metric")):
            killed_at.append(time.monotonic())
            return False
        return True

    second = threading.Thread(
        target=join_processes,
        args=(TrainConfig(**options, out_dir=str(tmp_path / "second")),),
        kwargs={
            "processes": 1,
            "nnodes": 2,
            "node_rank": 1,
            "rendezvous": rendezvous,
            "keep_going": wanted,
            "env": environment(),
        },
        daemon=True,
    )
    second.start()
    out = tmp_path / "first"

    with pytest.raises(TrainingProcessesFailed):
        train_in_processes(
            TrainConfig(**options, out_dir=str(out)),
            processes=1,
            nnodes=2,
            rendezvous=rendezvous,
            join_timeout_s=120,
            sink=first,
            env=environment(),
        )

    assert killed_at and time.monotonic() - killed_at[0] < 45
    assert first.of("metric") and not first.of("summary")
    assert not (out / "adapter").exists()
    second.join(timeout=60)


@pytest.mark.timeout(120)
def test_a_joining_machine_ends_its_ranks_once_its_run_is_no_longer_wanted(options, tmp_path):
    """No first machine ever comes; the job moved on, and the second one stops waiting at its next look."""
    answers = iter([True, False])
    started = time.monotonic()

    finished = join_processes(
        TrainConfig(**options, out_dir=str(tmp_path / "out")),
        processes=1,
        nnodes=2,
        node_rank=1,
        rendezvous=f"127.0.0.1:{free_port()}",
        join_timeout_s=120,
        keep_going=lambda: next(answers),
        env=environment(),
    )

    assert finished is False
    assert time.monotonic() - started < 30  # two looks, two seconds apart, and the ranks' exit; not the 120 s


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(400)
def test_a_job_over_two_machines_pauses_on_both_and_both_resume_from_its_checkpoint(
    alice, chat_file, settings, monkeypatch
):
    """Through the workers' code without a stack: job_run is node 0, and each join task runs job_join in a thread."""
    for name, value in environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    asked_to_join: list[tuple] = []
    second_machines: list[threading.Thread] = []

    def join_job(*args) -> None:
        asked_to_join.append(args)
        second_machines.append(threading.Thread(target=second_machine, args=args))
        second_machines[-1].start()

    def second_machine(job_id, attempt, node_rank, rendezvous, resume_step) -> None:
        try:
            services.job_join(
                job_id=job_id,
                attempt=attempt,
                node_rank=node_rank,
                rendezvous=rendezvous,
                resume_step=resume_step,
                worker="node-b",
            )
        finally:
            connection.close()

    monkeypatch.setattr("jobs_app.tasks.join_job.delay", join_job)
    # The user clicks pause once step 1 is on the chart: the watchdog answers "pause" from then on.
    steps_seen: list[int] = []
    report = JobSink.__call__

    def reporting(sink, kind, payload):
        steps_seen.extend([payload["step"]] if kind == "metric" else [])
        report(sink, kind, payload)

    monkeypatch.setattr(JobSink, "__call__", reporting)
    monkeypatch.setattr(Watchdog, "should_stop", lambda watchdog: "pause" if steps_seen else None)
    hyperparameters = {"batch_size": 1, "n_epochs": 2, "learning_rate_multiplier": 10}  # 16 steps
    settings.FT_TRAIN_RENDEZVOUS = "127.0.0.1:29400"  # each run below meets at a port free at its start

    def run(job: FineTuningJob) -> FineTuningJob:
        settings.FT_TRAIN_RENDEZVOUS = f"127.0.0.1:{free_port()}"
        services.job_run(job_id=job.pk, worker="node-a")
        for machine in second_machines:
            machine.join(timeout=120)
        job.refresh_from_db()
        return job

    def create(**asked) -> FineTuningJob:
        return services.job_create(
            owner=alice, model=BASE, training_file=chat_file.public_id, hyperparameters=hyperparameters, seed=3, **asked
        )

    job = run(create(nodes=2))
    assert job.status == FineTuningJob.PAUSED, job.error
    [checkpoint] = job.checkpoints.all()  # one, by node 0's rank 0, at the step where both machines stopped
    assert 1 <= checkpoint.step < 16
    steps_seen.clear()
    monkeypatch.setattr(Watchdog, "should_stop", lambda watchdog: None)
    services.job_resume(job=job)
    job = run(job)
    alone = run(create())

    assert job.status == alone.status == FineTuningJob.SUCCEEDED, job.error
    assert [(args[1], args[2], args[4]) for args in asked_to_join] == [(1, 1, None), (2, 1, checkpoint.step)]
    joined = job.events.filter(message__startswith="Machine 2 of 2 (node-b:")
    assert joined.count() == 2 and not any(machine.is_alive() for machine in second_machines)

    def losses(job: FineTuningJob) -> dict[int, float]:
        return {e.step: e.data["train_loss"] for e in job.events.filter(type="metrics").order_by("step")}

    assert list(losses(job)) == list(range(1, 17))  # each step once: those after the checkpoint trained again
    assert losses(job) == pytest.approx(losses(alone), abs=TOLERANCE)


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def machines(tmp_path, tiny_model_dir):
    """Machine A runs everything, machine B only a training worker: each can take a job, and the other joins it."""
    if not (postgres_up() and redis_up()):
        pytest.skip("PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 are needed for this test")
    import redis

    shared = tmp_path / "shared"
    shared.mkdir()
    with fresh_postgres_database("ft_across_machines") as database_url:
        redis.Redis.from_url(REDIS).flushdb()
        common = {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS,
            "FT_SHARED_DIR": str(shared),
            "SECRET_KEY": "the-same-secret-on-every-machine-of-this-test",
            # One host: both machines' own address is 127.0.0.1, and gloo talks over loopback.
            "FT_TRAIN_RENDEZVOUS": f"127.0.0.1:{free_port()}",
            "FT_TRAIN_JOIN_TIMEOUT": "60",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        # One after the other: each start migrates the shared database.
        b = start_stack(tmp_path / "b", {TINY_MODEL_ID: tiny_model_dir}, env={**common, "FT_ROLES": "train"})
        try:
            a = start_stack(tmp_path / "a", {TINY_MODEL_ID: tiny_model_dir}, env=common)
        except BaseException:
            stop_stack(b)
            raise
        yield a, b
        stop_stack(b)
        stop_stack(a)
        redis.Redis.from_url(REDIS).flushdb()


@pytest.mark.live
@pytest.mark.timeout(600)
def test_a_job_over_two_machines_is_trained_by_both_training_workers(machines):
    a, b = machines
    client = a.sdk(a.api_key("alice"))
    uploaded = client.files.create(file=("t.jsonl", chat_lines(8)), purpose="fine-tune")
    asked = {"model": TINY_MODEL_ID, "training_file": uploaded.id, "seed": 3}
    asked["hyperparameters"] = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}

    job = client.fine_tuning.jobs.create(**asked, extra_body={"nodes": 2})
    assert job.model_extra["nodes"] == 2
    job = wait_finished(client, job.id, timeout=240)
    assert job.status == "succeeded", job.error
    # The reference: the same job on one machine, in one process.
    alone = wait_finished(client, client.fine_tuning.jobs.create(**asked).id, timeout=240)
    assert alone.status == "succeeded", alone.error

    events = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    started = next(message for message in events if message.startswith("Training started on "))
    joining = next(message for message in events if message.startswith("Machine 2 of 2 ("))
    # "<host>:<celery worker name>:<pid>": one machine's worker took the job, the other's joined it.
    workers = {f"train-{a.port}@", f"train-{b.port}@"}
    assert {name for name in workers if name in started} | {name for name in workers if name in joining} == workers
    assert not any(name in started and name in joining for name in workers)
    assert any("2 processes (ddp)" in message for message in events)

    def losses(job_id: str) -> dict[int, float]:
        points = client.fine_tuning.jobs.list_events(job_id, limit=100)
        return {
            e.data["step"]: e.data["train_loss"] for e in points if e.type == "metrics" and e.data.get("train_loss")
        }

    assert sorted(losses(job.id)) == [1, 2]
    assert losses(job.id) == pytest.approx(losses(alone.id), abs=TOLERANCE)
