"""The job state machine: every change of a job's status goes through one function here.

Each transition names the states it may leave (`TRANSITIONS`) and claims the row
with one conditional UPDATE, so of two callers racing for the same move exactly
one wins, and a move from a state the table does not list changes nothing. Each
returns whether it won; the caller writes the notes and notifications.

A job is created `validating_files` (its files are still being validated, or a
share is being held out) or `queued`; from there:

    validating_files --validated--> queued --start--> running   (its files are ready, or the hold-out made them)
    validating_files --reject--> failed                  (a file failed validation, or the hold-out went wrong)
    running --finish/fail/pause/stop--> succeeded/failed/paused/cancelled   (its worker only)
    running --requeue--> queued                          (its heartbeat lapsed)
    validating_files/queued/paused --cancel--> cancelled  paused --resume--> queued
    failed/cancelled --retry--> queued

A running job is stopped through its worker: `request_cancel` and `request_pause`
only set the flag the worker reads every step, and the worker then makes the move
(`stop`, `pause`). Moves a worker makes carry its name and the attempt number it
started (a fencing token), so a run whose job was handed on after a lapsed
heartbeat never wins, even when the same worker process claimed the job again;
`holds` lets a run check the same before it writes anything else.

Only the row is written; the job object in hand keeps its old values (callers
`refresh_from_db()` when they need the new ones), except after `start`, whose
caller goes on to train the row it claimed. Two other writes are guarded the same
way without moving the status: `heartbeat` keeps a running job alive only while its
worker still holds it, and `files_checked` records once what a job waiting on its
files will train (before its hold-out).

A job waiting on its files has nothing resolved yet (`resolved` is empty): the
settings depend on the files. `waiting_on_files=True` limits a move to such a job.
"""

from datetime import datetime

from django.db.models import F
from django.utils import timezone

from .models import FineTuningJob

VALIDATING = FineTuningJob.VALIDATING
QUEUED = FineTuningJob.QUEUED
RUNNING = FineTuningJob.RUNNING
PAUSED = FineTuningJob.PAUSED
SUCCEEDED = FineTuningJob.SUCCEEDED
FAILED = FineTuningJob.FAILED
CANCELLED = FineTuningJob.CANCELLED

TRANSITIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    # name: (the states it may leave, the state it enters; None: the status stays, only the worker's flag is set)
    "validated": ((VALIDATING,), QUEUED),
    "start": ((QUEUED,), RUNNING),
    "request_pause": ((RUNNING,), None),
    "request_cancel": ((RUNNING,), None),
    "pause": ((RUNNING,), PAUSED),
    "resume": ((PAUSED,), QUEUED),
    "cancel": ((VALIDATING, QUEUED, PAUSED), CANCELLED),
    "stop": ((RUNNING,), CANCELLED),
    "finish": ((RUNNING,), SUCCEEDED),
    "reject": ((VALIDATING,), FAILED),
    "fail": ((RUNNING,), FAILED),
    "requeue": ((RUNNING,), QUEUED),
    "retry": ((FAILED, CANCELLED), QUEUED),
}

_WAITING_ON_FILES = {"resolved": {}}
"""The guard of a job waiting on its files: nothing is resolved until they are processed."""


def _move(
    job: FineTuningJob,
    name: str,
    *,
    held_by: str | None = None,
    attempt: int | None = None,
    stale_before: datetime | None = None,
    waiting_on_files: bool = False,
    **changes,
) -> bool:
    """Apply transition `name` to the job's row if it is in one of its from-states and the guards hold.

    `held_by`: only while this worker has the job; `attempt`: only while the run it started is the
    current one. `stale_before`: only while its heartbeat is older. `waiting_on_files`: only while
    its files are unchecked (nothing resolved yet).
    """
    leaves, enters = TRANSITIONS[name]
    guards: dict[str, object] = dict(_WAITING_ON_FILES) if waiting_on_files else {}
    if held_by is not None:
        guards["worker"] = held_by
    if attempt is not None:
        guards["attempts"] = attempt
    if stale_before is not None:
        guards["heartbeat_at__lt"] = stale_before
    if enters is not None:
        changes["status"] = enters
    return bool(FineTuningJob.objects.filter(pk=job.pk, status__in=leaves, **guards).update(**changes))


def validated(
    job: FineTuningJob,
    *,
    training_file,
    validation_file,
    resolved: dict,
    objective: str | None = None,
    waiting_on_files: bool = False,
) -> bool:
    """validating_files -> queued, training on these files: the parts the hold-out produced, or the
    files it waited on (`waiting_on_files`), now processed; `objective` when the files decided it."""
    return _move(
        job,
        "validated",
        waiting_on_files=waiting_on_files,
        training_file=training_file,
        validation_file=validation_file,
        training_file_ref=training_file.public_id,
        validation_file_ref=validation_file.public_id if validation_file else "",
        resolved=resolved,
        queued_at=timezone.now(),
        **({"objective": objective} if objective else {}),
    )


def files_checked(job: FineTuningJob, *, objective: str, resolved: dict) -> bool:
    """Record what a job whose files are now processed trains, once; the status stays validating_files
    while its hold-out is made. False when another caller recorded it first, or the job moved on."""
    return bool(
        FineTuningJob.objects.filter(pk=job.pk, status=VALIDATING, **_WAITING_ON_FILES).update(
            objective=objective, resolved=resolved
        )
    )


def start(job: FineTuningJob, *, worker: str) -> bool:
    """queued -> running on this worker (the claim); False if another worker won."""
    now = timezone.now()
    won = _move(
        job, "start", worker=worker, heartbeat_at=now, started_at=job.started_at or now, attempts=F("attempts") + 1
    )
    if won:
        job.refresh_from_db()
    return won


def request_pause(job: FineTuningJob) -> bool:
    """Ask the running worker to checkpoint and pause at its next step."""
    return _move(job, "request_pause", control="pause")


def request_cancel(job: FineTuningJob) -> bool:
    """Ask the running worker to stop at its next step."""
    return _move(job, "request_cancel", control="cancel")


def pause(job: FineTuningJob, *, worker: str, attempt: int | None = None) -> bool:
    """running -> paused: the worker saved a checkpoint and stopped, as asked."""
    return _move(job, "pause", held_by=worker, attempt=attempt, control="", estimated_finish=None)


def resume(job: FineTuningJob) -> bool:
    """paused -> queued, back in line for a worker."""
    return _move(job, "resume", control="", queued_at=timezone.now())


def cancel(job: FineTuningJob) -> bool:
    """validating_files/queued/paused -> cancelled: no worker has it, so it ends at once."""
    return _move(job, "cancel", control="", finished_at=timezone.now())


def stop(job: FineTuningJob, *, worker: str, attempt: int | None = None) -> bool:
    """running -> cancelled: the worker stopped, as asked."""
    return _move(
        job, "stop", held_by=worker, attempt=attempt, control="", finished_at=timezone.now(), estimated_finish=None
    )


def finish(
    job: FineTuningJob,
    *,
    worker: str,
    fine_tuned_model: str,
    trained_tokens: int | None,
    step: int,
    attempt: int | None = None,
) -> bool:
    """running -> succeeded with the model the worker trained."""
    return _move(
        job,
        "finish",
        held_by=worker,
        attempt=attempt,
        fine_tuned_model=fine_tuned_model,
        trained_tokens=trained_tokens,
        step=step,
        control="",
        finished_at=timezone.now(),
        estimated_finish=None,
    )


def reject(job: FineTuningJob, *, error: dict, waiting_on_files: bool = False) -> bool:
    """validating_files -> failed with `error`: the data could not be prepared, so it never queued.

    `waiting_on_files`: only while its files are unchecked (a file failed validation or does not fit).
    """
    return _move(
        job,
        "reject",
        waiting_on_files=waiting_on_files,
        error=error,
        control="",
        finished_at=timezone.now(),
        estimated_finish=None,
    )


def fail(
    job: FineTuningJob,
    *,
    error: dict,
    worker: str | None = None,
    attempt: int | None = None,
    stale_before: datetime | None = None,
) -> bool:
    """running -> failed with `error` ({"code", "message", "param"}).

    A running job fails through its worker (`worker`), or because its worker stopped
    answering (`stale_before`: its heartbeat is older); that worker is gone, so it is cleared.
    One of the two is required: nobody else may end a run.
    """
    if (worker is None) == (stale_before is None):
        raise ValueError("fail() takes the failing worker or the heartbeat cutoff, exactly one")
    lost = {"worker": ""} if stale_before is not None else {}
    return _move(
        job,
        "fail",
        held_by=worker,
        attempt=attempt,
        stale_before=stale_before,
        error=error,
        control="",
        finished_at=timezone.now(),
        estimated_finish=None,
        **lost,
    )


def requeue(job: FineTuningJob, *, stale_before: datetime) -> bool:
    """running -> queued when its heartbeat is older than `stale_before`: the worker is gone."""
    return _move(job, "requeue", stale_before=stale_before, worker="", queued_at=timezone.now())


def retry(job: FineTuningJob) -> bool:
    """failed/cancelled -> queued with a fresh set of attempts (the checkpoints stay)."""
    return _move(job, "retry", error=None, control="", finished_at=None, attempts=0, queued_at=timezone.now())


def heartbeat(job_pk: int, *, worker: str, attempt: int | None = None) -> bool:
    """Mark the running job alive on this worker; False once it is no longer this worker's run."""
    return bool(_held(job_pk, worker, attempt).update(heartbeat_at=timezone.now()))


def holds(job_pk: int, *, worker: str, attempt: int | None = None) -> bool:
    """Whether this worker's run (attempt) still has the running job: asked before a run writes."""
    return _held(job_pk, worker, attempt).exists()


def _held(job_pk: int, worker: str, attempt: int | None):
    attempts = {"attempts": attempt} if attempt is not None else {}
    return FineTuningJob.objects.filter(pk=job_pk, status=RUNNING, worker=worker, **attempts)
