"""The serving worker's side of an instance: start its process, pass shutdown on, report how it ended.

Runs inside the Celery task `run_instance`, one worker thread per instance. The
model lives in the child process (`manage.py serve_instance <id>`, see
`instance.py`), so a crash, a kill or an out-of-memory there costs one instance,
never the worker, and ending the process gives all its memory back.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from django.conf import settings
from django.db import DatabaseError, connection

from llm.serve.openmp import serving_environment

from ..models import Instance
from . import services

log = logging.getLogger(__name__)
# Set when the worker process is asked to shut down (see tasks.py): each child gets a SIGTERM.
host_shutting_down = threading.Event()
_POLL_SECONDS = 0.2
_STATUS_EVERY_SECONDS = 2.0
# A child whose row ended this long ago (stopped, marked dead by the reconciler) but which
# still runs is killed: it has nothing left to finish.
_GRACE_SECONDS = 30.0


def supervise_instance(instance_id: int, *, worker: str) -> int | None:
    """Run the instance's process until it ends and report its end; return its exit status (None: not started)."""
    if not Instance.objects.filter(pk=instance_id, status=Instance.STARTING).exists():
        return None  # stopped before a worker picked it up
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                str(settings.BASE_DIR / "manage.py"),
                "serve_instance",
                str(instance_id),
                "--worker",
                worker,
                "--parent-pid",
                str(os.getpid()),
            ],
            cwd=settings.BASE_DIR,
            env={**os.environ, **serving_environment()},
            # Its own process group: a Ctrl-C or a signal to the worker's group reaches the child
            # only through this supervisor, which forwards shutdown as SIGTERM.
            start_new_session=True,
        )
    except OSError as exc:
        instance = Instance.objects.get(pk=instance_id)
        services.instance_failed_to_load(instance=instance, message=f"Could not start the instance process: {exc}")
        return None
    log.info("instance %s: process %d started", instance_id, process.pid)
    exit_status = _wait(process, instance_id)
    log.info("instance %s: process %d ended with status %d", instance_id, process.pid, exit_status)
    services.instance_process_ended(instance_id=instance_id, exit_status=exit_status)
    return exit_status


def _wait(process: subprocess.Popen, instance_id: int) -> int:
    forwarded = False
    next_status_check = time.monotonic() + _STATUS_EVERY_SECONDS
    ended_at: float | None = None
    while True:
        try:
            return process.wait(timeout=_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        if host_shutting_down.is_set() and not forwarded:
            _signal(process, signal.SIGTERM)
            forwarded = True
        if time.monotonic() >= next_status_check:
            next_status_check = time.monotonic() + _STATUS_EVERY_SECONDS
            try:
                status = Instance.objects.filter(pk=instance_id).values_list("status", flat=True).first()
            except DatabaseError:  # the database restarting must not end the watch: try again later
                log.warning("instance %s: could not read its status", instance_id, exc_info=True)
                connection.close()
                continue
            if status in (Instance.STOPPED, Instance.DEAD, None):
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > _GRACE_SECONDS:
                    log.warning(
                        "instance %s ended %.0f s ago but its process still runs: killing it",
                        instance_id,
                        _GRACE_SECONDS,
                    )
                    _signal(process, signal.SIGKILL)


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # it has just ended
