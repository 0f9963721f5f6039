"""Tasks for tests/test_task_time_limits.py, loaded into a real worker with `celery worker -I`.

Each writes what happened to a file the test reads: the worker is another process.
"""

import os
import time
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded


def _note(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(f"{line} {os.getpid()}\n")


@shared_task(name="tests.task_time_limit_tasks.hang")
def hang(path: str, seconds: float, *, ignore_soft_limit: bool = False) -> None:
    """Sleep far past the limits; with ignore_soft_limit go on sleeping after the warning, as a stuck C call would."""
    _note(path, "started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(deadline - time.monotonic())
        except SoftTimeLimitExceeded:
            _note(path, "soft-limit")
            if not ignore_soft_limit:
                raise
    _note(path, "finished")


@shared_task(name="tests.task_time_limit_tasks.record")
def record(path: str) -> None:
    _note(path, "ran")
