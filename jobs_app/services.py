"""Writes for fine-tuning jobs: create, control, run (the engine boundary), recover."""

import errno
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from datasets_app import services as dataset_services
from datasets_app.models import Dataset
from deployments_app.catalog import BaseModel, TrainedModel, get_base_model, trained_model
from deployments_app.catalog.services import model_card_create_from_job
from deployments_app.deployments.services import cancel_deployments_of
from finetune_site import quotas
from finetune_site.broker import send_task, waiting_task_args
from finetune_site.errors import ApplicationError, Busy, InvalidInput, InvalidState
from finetune_site.metadata import check_metadata
from finetune_site.services import notify
from finetune_site.store import discard, store
from llm.train import ConfigError, TrainConfig
from llm.train.hyperparameters import to_engine

from . import transitions
from .hyperparameters import HOLDOUT_PERCENT, METHODS, check_hyperparameters, resolve_hyperparameters
from .models import Checkpoint, FineTuningJob, JobEvent
from .objectives import OBJECTIVES, check_hyperparameters_for, check_training_file, check_validation_file
from .publish import publish
from .sink import JobSink, Watchdog, wake_watchdog
from .trackers import check_integrations, check_report_to

log = logging.getLogger(__name__)


def _usable_file(owner, file_id: str, param: str) -> Dataset:
    """The caller's file, processed or still being validated (the job then waits for it)."""
    dataset = Dataset.objects.owned_by(owner).filter(public_id=file_id).first()
    if dataset is None:
        raise InvalidInput(f"No file with id {file_id!r} was found.", param=param, code="file_not_found")
    if dataset.status == Dataset.ERROR:
        first = (dataset.status_details or "").splitlines()[:1]
        raise InvalidInput(f"File {file_id} failed validation: {' '.join(first)}", param=param, code="invalid_file")
    if dataset.purpose != "fine-tune":
        raise InvalidInput(f"File {file_id} has purpose {dataset.purpose!r}, expected 'fine-tune'.", param=param)
    return dataset


def _fit_files(
    train_set: Dataset, valid_set: Dataset | None, *, objective: str | None, requested: dict, method: str
) -> tuple[str, dict]:
    """The objective processed files train and the settings resolved for them; refuse files that do not fit."""
    objective = check_training_file(train_set, objective)
    check_hyperparameters_for(requested, objective, training=train_set)
    if valid_set is not None:
        check_validation_file(valid_set, training=train_set)
    examples = train_set.examples or 0
    return objective, resolve_hyperparameters(requested, method=method, examples=examples, objective=objective)


@dataclass(frozen=True)
class _Start:
    """Where a new job starts: a base model, or a fine-tuned model of the same owner trained on it."""

    base: BaseModel
    trained: TrainedModel | None = None


def _starting_point(owner, model: str) -> _Start:
    base = get_base_model(model or "")
    trained = None
    if base is None:
        trained = trained_model(owner, model or "")
        if trained is None:
            raise InvalidInput(
                f"Model {model!r} is neither a base model here nor one of your fine-tuned models; see GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        base = get_base_model(trained.base_model)
        if base is None:
            raise InvalidState(
                f"Model {model} was trained on {trained.base_model}, which this server no longer offers.",
                param="model",
                code="model_not_ready",
            )
        if not store().has(trained.folder):
            raise InvalidState(f"The files of model {model} are gone.", param="model", code="model_not_ready")
    if not base.ready:
        raise InvalidState(
            f"Base model {base.id} is not prepared on this server yet.", param="model", code="model_not_ready"
        )
    return _Start(base, trained)


# Methods that continue the same kind of weights: a LoRA adapter trains on as LoRA or QLoRA.
_CONTINUES = {"lora": ("lora", "qlora"), "qlora": ("lora", "qlora"), "dora": ("dora",), "full": ("full",)}


def _check_continues(trained: TrainedModel, method: str) -> None:
    """Refuse a method that cannot go on from the fine-tuned model's weights, saying which can."""
    works = _CONTINUES[trained.method]
    if method in works:
        return
    what = "a full fine-tune (all of its weights)" if trained.method == "full" else f"a {trained.method} adapter"
    raise InvalidInput(
        f"Model {trained.id} is {what}: a job starting from it trains with training_type {' or '.join(works)}, "
        f"not {method}. For {method}, start from its base model {trained.base_model}.",
        param="training_type",
    )


def _check_active_jobs(owner) -> None:
    """One account may have FT_MAX_ACTIVE_JOBS_PER_USER jobs validating, queued or running (0: any number)."""
    most = settings.FT_MAX_ACTIVE_JOBS_PER_USER
    active = FineTuningJob.objects.owned_by(owner).active().count() if most else 0
    if most and active >= most:
        raise Busy(
            f"You have {active} fine-tuning jobs validating, queued or running, the most one account may have "
            "at once; create this one when one of them has finished, or cancel one.",
            retry_after=60,
            code="too_many_active_jobs",
        )


ASKED_OBJECTIVE = "asked_objective"
"""The key of the creation event's data that keeps the objective a waiting job was asked for (None: the file's)."""
_WAITING_ON_FILES = {"status": FineTuningJob.VALIDATING, "resolved": {}}
"""A job whose files were still being validated when it was created, until they are checked."""


@transaction.atomic
def job_create(
    *,
    owner,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    method: str | None = None,
    objective: str | None = None,
    hyperparameters: dict | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict | None = None,
    holdout_percent: int = 0,
    integrations: list | None = None,
    report_to: list[str] | None = None,
    processes: int | None = None,
    nodes: int | None = None,
    rendezvous: str | None = None,
) -> FineTuningJob:
    """Check everything a run needs, save the job queued and enqueue it after commit.

    method is the training type (lora when not given, or that of the fine-tuned model
    it starts from); objective is sft or dpo, or None to train what the training file holds.
    A file still being validated is checked when it is processed: the job waits in
    validating_files until then (`job_advance`). report_to names the experiment trackers
    (None: FT_REPORT_TO); integrations is OpenAI's, a W&B run. processes > 1 trains with that many
    torchrun ranks (None: FT_TRAIN_PROCESSES) on each of `nodes` machines, which meet at rendezvous
    (host:port of the machine whose worker claims the job; blank: that worker's FT_TRAIN_RENDEZVOUS).
    """
    _check_active_jobs(owner)
    quotas.check_not_full(owner)  # its checkpoints would be refused at once
    start = _starting_point(owner, model)
    method = method or (start.trained.method if start.trained else "lora")
    if method not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got {method!r}.", param="method")
    if start.trained is not None:
        _check_continues(start.trained, method)
    if objective is not None and objective not in OBJECTIVES:
        raise InvalidInput(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.", param="objective")
    suffix = (suffix or "").strip()
    if len(suffix) > 64:
        raise InvalidInput("suffix must be at most 64 characters.", param="suffix")
    if suffix and not all(ch.isalnum() or ch in "-_." for ch in suffix):
        raise InvalidInput("suffix may contain only letters, digits, '-', '_' and '.'.", param="suffix")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1):
        raise InvalidInput("seed must be an integer between 0 and 2147483647.", param="seed")
    check_metadata(metadata)
    integrations = check_integrations(integrations)
    report_to = check_report_to(settings.FT_REPORT_TO if report_to is None else report_to)
    requested = check_hyperparameters(hyperparameters)
    processes = _check_processes(settings.FT_TRAIN_PROCESSES if processes is None else processes)
    nodes = _check_nodes(1 if nodes is None else nodes)
    rendezvous = _check_rendezvous(rendezvous, nodes=nodes)
    train_set = _usable_file(owner, training_file, "training_file")
    valid_set = _usable_file(owner, validation_file, "validation_file") if validation_file else None
    waiting_on = [d.public_id for d in (train_set, valid_set) if d is not None and d.status == Dataset.UPLOADED]
    asked_objective, resolved = objective, {}
    if not waiting_on:
        objective, resolved = _fit_files(train_set, valid_set, objective=objective, requested=requested, method=method)
    most = HOLDOUT_PERCENT.maximum
    if holdout_percent and (valid_set is not None or not 1 <= holdout_percent <= most):
        raise InvalidInput(
            f"Hold out 1-{most}% for validation, and only when no validation file is given.", param="holdout_percent"
        )
    if requested.get("early_stopping_patience") not in (None, "auto", 0) and valid_set is None and not holdout_percent:
        raise InvalidInput(
            "Early stopping watches the validation loss: give a validation file or hold out a share of the data.",
            param="hyperparameters.early_stopping_patience",
        )

    job = FineTuningJob.objects.create(
        owner=owner,
        processes=processes,
        nodes=nodes,
        rendezvous=rendezvous,
        base_model=start.base.id,
        init_model=start.trained.id if start.trained else "",
        training_file=train_set,
        validation_file=valid_set,
        training_file_ref=train_set.public_id,
        validation_file_ref=valid_set.public_id if valid_set else "",
        method=method,
        objective=objective or FineTuningJob.SFT,  # until the files decide, when none was asked for
        hyperparameters=requested,
        resolved=resolved,  # empty while it waits on its files: the settings depend on them
        suffix=suffix,
        seed=seed if seed is not None else 42,
        metadata=metadata,
        integrations=integrations,
        report_to=report_to,
        holdout_percent=holdout_percent,
        status=FineTuningJob.VALIDATING if holdout_percent or waiting_on else FineTuningJob.QUEUED,
    )
    start_note = f" from {start.trained.id}" if start.trained else ""
    created = f"Created fine-tuning job {job.public_id}{start_note}."
    if waiting_on:
        # The row has no column for "the file decides the objective"; the creation event keeps what was asked.
        JobEvent.objects.create(
            job=job,
            message=f"{created} It starts once {' and '.join(waiting_on)} {'is' if len(waiting_on) == 1 else 'are'} "
            "validated.",
            data={ASKED_OBJECTIVE: asked_objective},
        )
        # A file that finished between the read above and this commit found no job waiting on it.
        transaction.on_commit(lambda: _advance_logged(job.pk, job.public_id))
        return job
    JobEvent.objects.create(job=job, message=created)
    if holdout_percent:
        from .tasks import prepare_holdout

        transaction.on_commit(lambda: prepare_holdout.delay(job.pk, holdout_percent))
    else:
        _enqueue(job)
    return job


def job_advance(*, job_id: int) -> bool:
    """Move on a job waiting on its files once they are validated: queue it (or hold out its share next),
    or fail it with the files' own errors. False while a file is still being validated, or when
    another caller moved it on first."""
    job = (
        FineTuningJob.objects.filter(pk=job_id, **_WAITING_ON_FILES)
        .select_related("training_file", "validation_file")
        .first()
    )
    if job is None:
        return False
    files = [("training_file", job.training_file, job.training_file_ref)]
    if job.validation_file_ref:
        files.append(("validation_file", job.validation_file, job.validation_file_ref))
    for param, dataset, file_id in files:
        error = _file_failure(param, dataset, file_id)
        if error is not None:
            return _reject_waiting(job, error)
    if any(dataset.status != Dataset.PROCESSED for _, dataset, _ in files):
        return False
    asked = job.events.filter(data__has_key=ASKED_OBJECTIVE).values_list("data", flat=True).first() or {}
    try:
        objective, resolved = _fit_files(
            job.training_file,
            job.validation_file,
            objective=asked.get(ASKED_OBJECTIVE),
            requested=job.hyperparameters,
            method=job.method,
        )
    except ApplicationError as exc:
        code = f"invalid_{exc.param}" if exc.param in ("training_file", "validation_file") else exc.code
        return _reject_waiting(
            job, {"code": code or "invalid_hyperparameters", "message": exc.message, "param": exc.param}
        )
    done = " and ".join(file_id for _, _, file_id in files)
    with transaction.atomic():
        if job.holdout_percent:
            if not transitions.files_checked(job, objective=objective, resolved=resolved):
                return False
            _note(job, f"{done} validated; holding out {job.holdout_percent}% of the training data for validation.")
            from .tasks import prepare_holdout

            percent = job.holdout_percent
            transaction.on_commit(lambda: prepare_holdout.delay(job.pk, percent))
            return True
        if not transitions.validated(
            job,
            training_file=job.training_file,
            validation_file=job.validation_file,
            resolved=resolved,
            objective=objective,
            waiting_on_files=True,
        ):
            return False
        _note(job, f"{done} validated; job queued.", status=FineTuningJob.QUEUED)
        _enqueue(job)
    return True


def jobs_advance_waiting_on(*, dataset_id: int) -> list[str]:
    """Move on every job waiting on this file, which has just been validated; the ids of those moved."""
    waiting = FineTuningJob.objects.filter(Q(training_file_id=dataset_id) | Q(validation_file_id=dataset_id))
    return _advance_each(waiting.filter(**_WAITING_ON_FILES))


def _advance_each(jobs) -> list[str]:
    return [public_id for pk, public_id in jobs.values_list("pk", "public_id") if _advance_logged(pk, public_id)]


def _advance_logged(pk: int, public_id: str) -> bool:
    """job_advance for the callers that must go on whatever happens (a validation worker, the sweep)."""
    try:
        return job_advance(job_id=pk)
    except Exception:
        log.exception("moving on job %s, which waits on its files, failed; the periodic sweep tries again", public_id)
        return False


ERROR_DETAILS_CHARS = 2000
"""How much of a file's validation report a job's error repeats (the file's status_details has all of it)."""


def _file_failure(param: str, dataset: Dataset | None, file_id: str) -> dict | None:
    """The job's error when the file it waits on failed validation or was deleted, else None."""
    what = "Training" if param == "training_file" else "Validation"
    if dataset is None:
        message = f"{what} file {file_id} was deleted before it was validated; upload it again and create a new job."
    elif dataset.status == Dataset.ERROR:
        details = (dataset.status_details or "").strip()
        if len(details) > ERROR_DETAILS_CHARS:
            details = details[:ERROR_DETAILS_CHARS].rsplit("\n", 1)[0] + "\n  ... (the file's status_details lists all)"
        message = f"{what} file {file_id} failed validation. {details}"
    else:
        return None
    return {"code": f"invalid_{param}", "message": message, "param": param}


def _reject_waiting(job: FineTuningJob, error: dict) -> bool:
    if not transitions.reject(job, error=error, waiting_on_files=True):
        return False
    _note(job, error["message"], level="error", status=FineTuningJob.FAILED)
    _notify_finished(job)
    return True


def job_prepare_holdout(*, job_id: int, percent: int) -> None:
    """Split the training file into train and validation parts, then queue the job."""

    job = (
        FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.VALIDATING)
        .exclude(resolved={})  # its files are still being validated: job_advance sends this task again
        .select_related("training_file")
        .first()
    )
    if job is None:
        return
    try:
        train_part, valid_part = dataset_services.dataset_split(
            dataset=job.training_file, validation_percent=percent, seed=job.seed, validate=False
        )
        for part in (train_part, valid_part):
            dataset_services.dataset_validate(dataset_id=part.pk)
            part.refresh_from_db()
            if part.status != Dataset.PROCESSED:
                raise InvalidInput(f"The {part.filename} part failed validation: {part.status_details[:300]}")
    except Exception as exc:
        refused = isinstance(exc, ApplicationError)  # a refusal explains itself; anything else is a bug to log
        message = exc.message if refused else f"{type(exc).__name__}: {exc}"
        if not refused:
            log.exception("holding out validation data for job %s failed", job.public_id)
        code = (exc.code if refused else None) or "invalid_file"  # storage_quota_exceeded says more
        if transitions.reject(job, error={"code": code, "message": message, "param": "holdout_percent"}):
            _note(job, f"Could not hold out validation data: {message}", level="error", status=FineTuningJob.FAILED)
            _notify_finished(job)
        return
    with transaction.atomic():
        resolved = resolve_hyperparameters(
            job.hyperparameters, method=job.method, examples=train_part.examples or 0, objective=job.objective
        )
        if not transitions.validated(job, training_file=train_part, validation_file=valid_part, resolved=resolved):
            # Another hold-out of this job (a task sent again by requeue_lost_jobs) won: its parts stand.
            for part in (train_part, valid_part):
                dataset_services.dataset_delete(dataset=part)
            return
        job.refresh_from_db()
        _note(
            job,
            f"Held out {valid_part.examples} examples ({percent}%) for validation as {valid_part.public_id}.",
            status=job.status,
        )
        _enqueue(job)


def _enqueue(job: FineTuningJob) -> None:
    from .tasks import train_job

    transaction.on_commit(lambda: train_job.delay(job.pk))


def _note(job: FineTuningJob, message: str, *, level: str = "info", status: str | None = None) -> None:
    row = JobEvent.objects.create(job=job, level=level, message=message)
    publish(
        job.public_id,
        {"type": "event", "level": level, "message": message, "created_at": int(row.created_at.timestamp())},
    )
    if status:
        publish(job.public_id, {"type": "status", "status": status})


@transaction.atomic
def job_cancel(*, job: FineTuningJob) -> FineTuningJob:
    """Stop a job: at once if it is not running, else at the worker's next step."""
    if job.is_final:
        raise InvalidState(f"Job {job.public_id} has already {job.status}.", code="invalid_state")
    if transitions.cancel(job):
        _note(job, "Job cancelled.", status=FineTuningJob.CANCELLED)
    elif transitions.request_cancel(job):
        wake_watchdog(job.pk)
        _note(job, "Cancellation requested; stopping at the next step.")
    job.refresh_from_db()
    return job


@transaction.atomic
def job_pause(*, job: FineTuningJob) -> FineTuningJob:
    """Ask the running worker to checkpoint and stop; resume continues from there."""
    if not transitions.request_pause(job):
        raise InvalidState(f"Only a running job can be paused; {job.public_id} is {job.status}.", code="invalid_state")
    wake_watchdog(job.pk)
    _note(job, "Pause requested; saving a checkpoint at the next step.")
    job.refresh_from_db()
    return job


@transaction.atomic
def job_resume(*, job: FineTuningJob) -> FineTuningJob:
    if not transitions.resume(job):
        raise InvalidState(f"Only a paused job can be resumed; {job.public_id} is {job.status}.", code="invalid_state")
    job.refresh_from_db()
    _note(job, "Job resumed; waiting for a training worker.", status=job.status)
    _enqueue(job)
    return job


@transaction.atomic
def job_retry(*, job: FineTuningJob) -> FineTuningJob:
    """Run a failed or cancelled job again, from its last checkpoint when it has one."""
    if not job.resolved and job.status in (FineTuningJob.FAILED, FineTuningJob.CANCELLED):
        raise InvalidState(
            f"Job {job.public_id} ended before its files were checked, so there is nothing to run again; "
            "create a new job with files that validate.",
            code="invalid_state",
        )
    if not transitions.retry(job):
        raise InvalidState(
            f"Only a failed or cancelled job can be retried; {job.public_id} is {job.status}.", code="invalid_state"
        )
    job.refresh_from_db()
    last = job.checkpoints.order_by("-step").first()
    _note(
        job,
        "Retrying" + (f" from the checkpoint at step {last.step}." if last else " from the start."),
        status=job.status,
    )
    _enqueue(job)
    return job


@transaction.atomic
def job_delete(*, job: FineTuningJob) -> FineTuningJob:
    """Delete a job that is not running (zhipuai's jobs.delete); its model stays."""
    if job.status in (FineTuningJob.RUNNING,):
        raise InvalidState(f"Job {job.public_id} is running; cancel it first.", code="invalid_state")

    snapshot = FineTuningJob.objects.get(pk=job.pk)
    output_dir = job.output_dir
    has_model = hasattr(job, "model_card")
    # Deployments of its checkpoints would lose their weights; the model's own keep serving.
    cancel_deployments_of(job.owner, job.fine_tuned_model_id, checkpoints_only=has_model)
    job.delete()
    # The checkpoints go with the job (their rows cascade, their ids stop resolving);
    # the model, when there is one, stays in its folder until it is deleted itself.
    doomed = output_dir / "checkpoints" if has_model else output_dir
    transaction.on_commit(lambda: discard(doomed))
    return snapshot


def recover_stale_jobs() -> list[str]:
    """Re-queue running jobs whose worker stopped sending heartbeats (fail them after FT_MAX_JOB_ATTEMPTS)."""
    cutoff = timezone.now() - timedelta(seconds=settings.FT_HEARTBEAT_TIMEOUT)
    recovered = []
    for job in FineTuningJob.objects.filter(status=FineTuningJob.RUNNING, heartbeat_at__lt=cutoff):
        if job.attempts >= settings.FT_MAX_JOB_ATTEMPTS:
            message = (
                f"The worker stopped responding {job.attempts} times while running this job "
                f"(last: {job.worker or '?'}); it was not re-queued again. Checkpoints are kept: retry to resume."
            )
            if transitions.fail(
                job, error={"code": "worker_lost", "message": message, "param": None}, stale_before=cutoff
            ):
                _note(job, message, level="error", status=FineTuningJob.FAILED)
                _notify_finished(job)
            continue
        with transaction.atomic():
            if not transitions.requeue(job, stale_before=cutoff):
                continue
            last = job.checkpoints.order_by("-step").first()
            where = f"from the checkpoint at step {last.step}" if last else "from the start"
            _note(
                job,
                f"Worker {job.worker or '?'} stopped responding; job re-queued and resumes {where}.",
                level="warn",
                status=FineTuningJob.QUEUED,
            )
            _enqueue(job)
        recovered.append(job.public_id)
    return recovered


LOST_QUEUED_SECONDS = 60
"""A queued job whose message has not been in the training queue for this long is sent again."""
LOST_HOLDOUT_SECONDS = 600
"""The same for a job holding out validation data; longer, since nothing claims a hold-out and a second
one while the first still runs would split the file twice (the second split then changes nothing)."""


def requeue_lost_jobs() -> list[str]:
    """Send again the task of each job left waiting whose message the broker no longer holds.

    Tasks are acknowledged as they start, so a message is gone once a worker takes it: a Redis
    restarted without it, or a worker that died between taking it and claiming the job, leaves a
    job queued (or validating_files) that nothing would ever run. A job whose message still waits
    in the queue is left alone however long it waits, so a busy training queue gets no copies; so
    is one a worker reserved within the threshold (after it, that worker is taken to be dead).
    A second message is harmless: the first to claim the job (`transitions.start`) runs it, and the
    other finds it no longer queued and does nothing.

    A job waiting on its files has no message to lose: it is moved on when a file is validated. When
    that call was lost (a validation worker killed after it recorded the file), this moves it on.
    """
    from .tasks import prepare_holdout, train_job  # tasks imports this module

    sent = _advance_each(FineTuningJob.objects.filter(**_WAITING_ON_FILES))
    now = timezone.now()
    waiting = {
        FineTuningJob.QUEUED: (train_job, timedelta(seconds=LOST_QUEUED_SECONDS)),
        FineTuningJob.VALIDATING: (prepare_holdout, timedelta(seconds=LOST_HOLDOUT_SECONDS)),
    }
    for status, (task, after) in waiting.items():
        candidates = list(
            FineTuningJob.objects.filter(status=status, queued_at__lt=now - after)
            .exclude(resolved={})  # waiting on its files, above
            .values_list("pk", "public_id", "holdout_percent")
        )
        if not candidates:
            continue
        in_queue = {args[0] for args in waiting_task_args(task.name, reserved_within=after.total_seconds()) if args}
        for pk, public_id, percent in candidates:
            # Read again after the queue: a worker may have claimed it meanwhile.
            if pk in in_queue or not FineTuningJob.objects.filter(pk=pk, status=status).exists():
                continue
            args = (pk,) if status == FineTuningJob.QUEUED else (pk, percent)
            log.warning("job %s is %s but its task is in no queue: sending it again", public_id, status)
            send_task(task, *args)
            sent.append(public_id)
    return sent


# --- The engine boundary -------------------------------------------------------


def build_train_config(job: FineTuningJob, *, resume_from: str | None):
    # The resolved settings carry OpenAI's names; to_engine is the one place they become the engine's.
    hyperparameters = to_engine(job.resolved)
    if not job.validation_file:
        hyperparameters["early_stopping_patience"] = 0  # nothing to watch
    return TrainConfig(
        model=str(get_base_model(job.base_model).path),
        train_file=_local_path(job.training_file),
        validation_file=_local_path(job.validation_file) if job.validation_file else None,
        out_dir=str(job.output_dir),
        method=job.method,
        objective=job.objective,
        init_from=_init_folder(job),
        seed=job.seed,
        resume_from=resume_from,
        device=settings.FT_DEVICE,
        keep_checkpoints=settings.FT_KEEP_CHECKPOINTS,
        **hyperparameters,
    )


def _init_folder(job: FineTuningJob) -> str | None:
    """The weights of the fine-tuned model the job starts from (for dpo also its reference model)."""
    if not job.init_model:
        return None
    trained = trained_model(job.owner, job.init_model)
    if trained is not None:
        store().fetch(trained.folder)  # trained on another machine, perhaps
    if trained is None or not trained.folder.is_dir():
        raise ConfigError([f"init_from: the model {job.init_model} this job starts from was deleted"])
    return str(trained.folder)


def _local_path(dataset: Dataset) -> str:
    # Training reads the normalized chat lines the validator wrote.
    field = dataset.normalized or dataset.file
    return str(store().fetch(field.path))


def _check_processes(processes) -> int:
    most = settings.FT_TRAIN_MAX_PROCESSES
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= most:
        raise InvalidInput(
            f"processes must be a whole number from 1 to {most} (FT_TRAIN_MAX_PROCESSES), got {processes!r}.",
            param="processes",
        )
    return processes


def _check_nodes(nodes) -> int:
    most = settings.FT_TRAIN_MAX_NODES
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= most:
        raise InvalidInput(
            f"nodes must be a whole number of machines from 1 to {most} (FT_TRAIN_MAX_NODES), got {nodes!r}.",
            param="nodes",
        )
    return nodes


def _check_rendezvous(rendezvous, *, nodes: int) -> str:
    """The job's own meeting address ("" to use the claiming worker's FT_TRAIN_RENDEZVOUS); one there must be."""
    if rendezvous is not None and not isinstance(rendezvous, str):
        raise InvalidInput(f"rendezvous must be a host:port string, got {rendezvous!r}.", param="rendezvous")
    rendezvous = (rendezvous or "").strip()
    if rendezvous and nodes == 1:
        raise InvalidInput(
            "rendezvous is where several machines meet: give it only with nodes > 1.", param="rendezvous"
        )
    host, _, port = rendezvous.rpartition(":")
    well_formed = host and not any(ch.isspace() for ch in host) and port.isdigit() and 1 <= int(port) <= 65535
    if rendezvous and not (well_formed and len(rendezvous) <= 260):
        raise InvalidInput(
            f"rendezvous must be host:port (an address of a training machine, port 1-65535), got {rendezvous!r}.",
            param="rendezvous",
        )
    if nodes > 1 and not (rendezvous or settings.FT_TRAIN_RENDEZVOUS):
        raise InvalidInput(
            f"A job over {nodes} machines needs an address where they meet: give rendezvous (host:port of a "
            "training machine) or set FT_TRAIN_RENDEZVOUS on the server.",
            param="rendezvous",
        )
    return rendezvous


def job_run(*, job_id: int, worker: str | None = None) -> None:
    """Claim a queued job and train it to the end, a pause, a cancel or a failure."""
    from llm.train import train  # loads torch: only the training worker pays for it
    from llm.train.checkpoint import DiskFull, limit_room
    from llm.train.launch import TrainingProcessesFailed

    job = FineTuningJob.objects.filter(pk=job_id).first()
    # Unique per process: two worker processes on one host must never pass for each other.
    worker = f"{worker or socket.gethostname()}:{os.getpid()}"
    if job is None or not transitions.start(job, worker=worker):
        return
    checkpoint = _resumable_checkpoint(job)
    # Steps after the checkpoint we resume from will be trained again: drop
    # their points so the curve never shows a step twice.
    job.events.filter(type=JobEvent.METRICS, step__gt=checkpoint.step if checkpoint else -1).delete()
    sink = JobSink(job)
    resume_note = f" from the checkpoint at step {checkpoint.step}" if checkpoint else ""
    sink.event(f"Training started on {worker}{resume_note} (attempt {job.attempts}).")
    publish(job.public_id, {"type": "status", "status": FineTuningJob.RUNNING})

    summary, failure = None, None
    watchdog = Watchdog(job, heartbeat_seconds=settings.FT_HEARTBEAT_SECONDS)

    def should_stop():
        return "cancel" if sink.lost else watchdog.should_stop()

    try:
        config = build_train_config(job, resume_from=checkpoint.path if checkpoint else None)
        with watchdog:
            # Inside the watch: a tracker may take seconds to open, and the heartbeat must go on meanwhile.
            sink.open_trackers(resume_step=checkpoint.step if checkpoint else None)
            if job.processes > 1 or job.nodes > 1:
                summary = _train_in_processes(job, config, checkpoint, sink=sink, should_stop=should_stop)
            else:
                summary = train(config, sink=sink, should_stop=should_stop)
            if summary is not None and not summary.get("stopped"):
                # Before the job succeeds, for whoever serves it; inside the watch, as a big upload takes a while.
                store().publish(job.model_dir)
    except ConfigError as exc:
        failure = {"code": "invalid_config", "message": "; ".join(exc.problems), "param": None}
    except DiskFull as exc:
        failure = {"code": "disk_full", "message": exc.strerror, "param": None}
    except TrainingProcessesFailed as exc:  # one rank died: torchrun ended the others, the attempt fails
        failure = {"code": "training_failed", "message": str(exc)[-2000:], "param": None}
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a write between checkpoints
            message = f"The disk filled while training ({exc.strerror}). Earlier checkpoints are kept; free some "
            failure = {"code": "disk_full", "message": message + "space and retry the job.", "param": None}
        else:
            log.exception("job %s failed", job.public_id)
            failure = {"code": "training_failed", "message": f"{type(exc).__name__}: {exc}", "param": None}
    finally:
        limit_room(job.output_dir, None)  # the sink asked for the quota check; the run is over
        if watchdog.lost or sink.lost:
            sink.discard()
        sink.flush()
        # Before the job's status says it ended, so whoever sees it final finds the trackers' files complete.
        sink.close_trackers(_outcome(summary, failure, lost=watchdog.lost or sink.lost))
    if watchdog.lost or sink.lost:
        log.warning(
            "job %s: %s stopped; the job was handed to another worker after its heartbeat lapsed", job.public_id, worker
        )
        return
    _finish_run(job, summary, failure, sink)


def _train_in_processes(job: FineTuningJob, config: TrainConfig, checkpoint: Checkpoint | None, *, sink, should_stop):
    """Train under torchrun: rank 0's lines reach the sink as train()'s would; a stop reaches every rank at one step.

    Over several machines this worker's is node 0: it hosts the rendezvous, so global rank 0 (the one that reports
    and writes checkpoints) is its own, and it asks training workers elsewhere to join (job_join), from the same
    checkpoint. Machines that do not come within FT_TRAIN_JOIN_TIMEOUT fail the attempt.
    """
    from llm.train.launch import MachinesDidNotJoin, TrainingProcessesFailed, train_in_processes

    run_id = f"{job.public_id}-{job.attempts}"  # a new attempt never joins an old one's ranks
    if job.nodes == 1:
        return train_in_processes(config, processes=job.processes, sink=sink, should_stop=should_stop, run_id=run_id)
    from .tasks import join_job

    rendezvous = _rendezvous_here(job)
    timeout = settings.FT_TRAIN_JOIN_TIMEOUT
    others = job.nodes - 1
    sink.event(
        f"Training on {job.nodes} machines, {job.processes} processes each: waiting up to {timeout} s at "
        f"{rendezvous} for {others} more machine{'s' if others > 1 else ''} to join."
    )
    for node_rank in range(1, job.nodes):
        join_job.delay(job.pk, job.attempts, node_rank, rendezvous, checkpoint.step if checkpoint else None)
    try:
        return train_in_processes(
            config,
            processes=job.processes,
            sink=sink,
            should_stop=should_stop,
            run_id=run_id,
            nnodes=job.nodes,
            rendezvous=rendezvous,
            join_timeout_s=timeout,
        )
    except MachinesDidNotJoin as exc:
        raise TrainingProcessesFailed(
            f"{exc} Each other machine needs an idle training worker that can reach that address "
            "(FT_TRAIN_JOIN_TIMEOUT sets the wait)."
        ) from exc


def _rendezvous_here(job: FineTuningJob) -> str:
    """Where the machines meet: the job's address, else this worker's FT_TRAIN_RENDEZVOUS; one of this machine's."""
    from llm.train.launch import is_this_machine, split_rendezvous

    rendezvous = job.rendezvous or settings.FT_TRAIN_RENDEZVOUS
    here = socket.gethostname()
    if not rendezvous:
        raise ConfigError([f"rendezvous: a job over {job.nodes} machines needs FT_TRAIN_RENDEZVOUS set on {here}"])
    host, _ = split_rendezvous(rendezvous)
    if not is_this_machine(host):
        # Node 0 hosts the rendezvous store: an address of another machine would leave everyone waiting.
        raise ConfigError(
            [
                f"rendezvous: {rendezvous} is not an address of {here}, whose worker took the job and hosts the "
                "rendezvous; leave the job's rendezvous blank and set FT_TRAIN_RENDEZVOUS on each training machine "
                "to one of its own addresses"
            ]
        )
    return rendezvous


def job_join(
    *, job_id: int, attempt: int, node_rank: int, rendezvous: str, resume_step: int | None, worker: str | None = None
) -> None:
    """Run this machine's ranks of a job another worker trains over several machines, as node node_rank.

    Only while the job is still running in the attempt that asked: its ranks end as soon as it is not (finished,
    paused, cancelled, re-queued). They report nothing and write nothing; a failure is logged and left to node 0,
    whose collectives fail with it, failing the attempt.
    """
    from llm.train.launch import join_processes

    this_attempt = FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.RUNNING, attempts=attempt)
    job = this_attempt.first()
    if job is None:
        log.info("job %s is no longer running attempt %s: machine %s does not join", job_id, attempt, node_rank + 1)
        return
    worker = f"{worker or socket.gethostname()}:{os.getpid()}"
    machine = f"Machine {node_rank + 1} of {job.nodes} ({worker})"
    try:
        checkpoint = _checkpoint_at(job, resume_step)
        _note(job, f"{machine} joins the training at {rendezvous}.")
        config = build_train_config(job, resume_from=checkpoint.path if checkpoint else None)
        finished = join_processes(
            config,
            processes=job.processes,
            nnodes=job.nodes,
            node_rank=node_rank,
            rendezvous=rendezvous,
            run_id=f"{job.public_id}-{attempt}",
            join_timeout_s=settings.FT_TRAIN_JOIN_TIMEOUT,
            keep_going=this_attempt.exists,
        )
    except Exception as exc:  # node 0 fails the attempt; this machine only says why
        log.exception("job %s: machine %s failed", job.public_id, node_rank + 1)
        if this_attempt.exists():
            message = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            _note(job, f"{machine} stopped: {message[-1000:]}", level="warn")
        return
    if not finished:
        log.info("job %s moved on: machine %s ended its ranks", job.public_id, node_rank + 1)


def _checkpoint_at(job: FineTuningJob, step: int | None) -> Checkpoint | None:
    """The checkpoint node 0 resumes from, here too (fetched when it was written on another machine)."""
    if step is None:
        return None
    checkpoint = job.checkpoints.filter(step=step).first()
    if checkpoint is None:  # starting afresh here would train another model than node 0's
        raise ConfigError([f"resume_from: the checkpoint at step {step} that node 0 resumes from is gone"])
    store().fetch(checkpoint.path)
    return checkpoint


def _outcome(summary: dict | None, failure: dict | None, *, lost: bool) -> str:
    """How a run ended, in the trackers' words (jobs_app.trackers.OUTCOMES)."""
    if lost:
        return "lost"
    if failure is not None or summary is None:
        return "failed"
    if summary.get("stopped"):
        return "paused" if summary["stopped"] == "pause" else "cancelled"
    return "succeeded"


def _resumable_checkpoint(job: FineTuningJob) -> Checkpoint | None:
    """The newest checkpoint a run can continue from; damaged ones (a torn write, a bad disk) are dropped."""
    from llm.train.checkpoint import damage

    for checkpoint in job.checkpoints.order_by("-step"):
        store().fetch(checkpoint.path)  # an earlier attempt may have run on another machine
        problem = damage(checkpoint.path)
        if problem is None:
            return checkpoint
        _note(
            job,
            f"The checkpoint at step {checkpoint.step} cannot be read ({problem}); it was removed, and the run "
            "continues from the one before it.",
            level="warn",
        )
        checkpoint.delete()
        discard(checkpoint.path)
    return None


def _finish_run(job: FineTuningJob, summary: dict | None, failure: dict | None, sink: JobSink) -> None:
    """End the run's job as the run ended, in one transaction, only while the job is still this run's."""
    # The run's fencing token, as start() claimed it: a run whose job was re-queued (and perhaps
    # claimed again, even by this same worker) changes nothing, makes no model and tells no one.
    worker, attempt = job.worker, job.attempts
    with transaction.atomic():
        if failure is not None:
            won = transitions.fail(job, error=failure, worker=worker, attempt=attempt)
            final, note, level = FineTuningJob.FAILED, f"Training failed: {failure['message']}", "error"
        elif summary.get("stopped") == "pause":
            won = transitions.pause(job, worker=worker, attempt=attempt)
            final, note, level = FineTuningJob.PAUSED, "Job paused; resume continues from the last checkpoint.", "info"
        elif summary.get("stopped"):
            won = transitions.stop(job, worker=worker, attempt=attempt)
            final, note, level = FineTuningJob.CANCELLED, "Job cancelled; finished checkpoints are kept.", "info"
        else:
            job.refresh_from_db(fields=["step", "total_steps"])
            won = transitions.finish(
                job,
                worker=worker,
                attempt=attempt,
                fine_tuned_model=job.fine_tuned_model_id,
                trained_tokens=summary.get("train_tokens"),
                step=job.total_steps or job.step,
            )
            if won:
                from evals_app.auto import evaluate_job_later  # evals_app imports the serving path

                job.refresh_from_db()
                model_card_create_from_job(job=job, summary=summary)
                evaluate_job_later(job)  # runs on commit; never fails the job
            final = FineTuningJob.SUCCEEDED
            note, level = f"Fine-tuning succeeded. New model: {job.fine_tuned_model_id}", "info"
    if not won:
        # The job was handed to another run meanwhile: its news is that run's to tell.
        log.warning(
            "job %s: %s (attempt %s) ended the run (%s) but no longer holds the job",
            job.public_id,
            worker,
            attempt,
            final,
        )
        return
    _note(job, note, level=level, status=final)
    if final in (FineTuningJob.SUCCEEDED, FineTuningJob.FAILED):
        _notify_finished(job)


def _notify_finished(job: FineTuningJob) -> None:
    """Tell the owner (in-app, and by email and webhook where set up) that a job succeeded or failed."""

    job.refresh_from_db()
    notify(
        job.owner,
        f"Job {job.public_id} {job.status}." + (f" Model: {job.fine_tuned_model}" if job.fine_tuned_model else ""),
        level="info" if job.status == FineTuningJob.SUCCEEDED else "error",
        link=f"/jobs/{job.public_id}/",
        event=f"fine_tuning.job.{job.status}",
        data={
            "id": job.public_id,
            "status": job.status,
            "fine_tuned_model": job.fine_tuned_model or None,
            "error": job.error,
        },
    )
