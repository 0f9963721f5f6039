"""The engine's sink for a job: turns engine callbacks into rows and live messages."""

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import redis
from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.utils import timezone

from deployments_app.deployments.streams import sync_client
from finetune_site import quotas
from finetune_site.store import StoreError, store

from . import transitions
from .models import Checkpoint, FineTuningJob, JobEvent
from .publish import metrics_event_data, publish
from .selectors import SMOOTHING
from .trackers import RunInfo, Trackers, eval_metrics, train_metrics

log = logging.getLogger(__name__)
_FLUSH_SECONDS = 1.0
_FLUSH_ROWS = 50


@dataclass(frozen=True)
class _Watched:
    """The metric the overfitting warning compares between training and validation."""

    train_key: str
    valid_key: str
    lower_is_better: bool
    train_words: str
    valid_words: str
    advice: str

    @property
    def worse(self) -> str:
        return "rose" if self.lower_is_better else "fell"

    @property
    def better(self) -> str:
        return "fell" if self.lower_is_better else "rose"


_WATCHED = {
    FineTuningJob.SFT: _Watched(
        "loss",
        "eval_loss",
        True,
        "training loss",
        "validation loss",
        "Consider fewer epochs, a lower learning rate or early stopping.",
    ),
    # A DPO loss can keep falling on the training pairs only; the margin between chosen and
    # rejected on held-out pairs is what says the preference still generalises.
    FineTuningJob.DPO: _Watched(
        "reward_margin",
        "eval_reward_margin",
        False,
        "the training reward margin",
        "validation reward margin",
        "Consider fewer epochs, a lower learning rate, a higher beta or early stopping.",
    ),
}


class JobSink:
    """Receives every metric, eval, event and checkpoint of one run.

    Metric rows are written in batches (a row per step would make SQLite the
    bottleneck of small models); live messages go out at once.
    """

    def __init__(self, job: FineTuningJob):
        self.job = job
        # The run's fencing token: written rows are this run's only while the job is still its.
        self.worker, self.attempt = job.worker, job.attempts
        self.lost = False
        """True once a write found the job handed to another run; nothing more is written."""
        self.summary: dict | None = None
        self._pending: list[JobEvent] = []
        self._last_flush = time.monotonic()
        self._progress: dict = {}
        self._watched = _WATCHED[job.objective]
        self._smoothed_train: float | None = None  # of the watched training metric
        self._evals: list[tuple[float, float]] = []  # (watched validation metric, smoothed training metric)
        self._warned_overfitting = False
        self.trackers = Trackers(warn=lambda message: self.event(message, level="warn"))
        from llm.train.checkpoint import limit_room  # loads torch: only a training run needs it

        # Before each checkpoint the engine asks whether the owner's storage quota has room for it.
        limit_room(job.output_dir, partial(quotas.checkpoint_refusal, job.owner_id))

    def __call__(self, kind: str, payload: dict) -> None:
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(payload)

    def _on_metric(self, payload: dict) -> None:
        data = metrics_event_data("metric", payload)
        message = f"Step {payload['step']}/{payload.get('total_steps')}: training loss={payload.get('loss', 0):.4f}"
        self._pending.append(
            JobEvent(job=self.job, type=JobEvent.METRICS, step=payload["step"], message=message, data=data)
        )
        self._progress = payload
        value = payload.get(self._watched.train_key)
        if value is not None:
            previous = self._smoothed_train
            self._smoothed_train = value if previous is None else SMOOTHING * previous + (1 - SMOOTHING) * value
        # emitted_at lets a client measure engine-to-browser latency (benchmarks/curve_latency.py).
        publish(self.job.public_id, {"type": "metric", **data, "emitted_at": time.time()})
        if not self.lost:
            self.trackers.log(train_metrics(payload), payload["step"])
        self._maybe_flush()

    def _on_eval(self, payload: dict) -> None:
        data = metrics_event_data("eval", payload)
        message = f"Step {payload['step']}: validation loss={payload.get('eval_loss', 0):.4f}"
        self._pending.append(
            JobEvent(job=self.job, type=JobEvent.METRICS, step=payload["step"], message=message, data=data)
        )
        publish(self.job.public_id, {"type": "eval", **data})
        if not self.lost:
            self.trackers.log(eval_metrics(payload), payload["step"])
        self._watch_overfitting(payload.get(self._watched.valid_key))
        self._maybe_flush()

    def _watch_overfitting(self, valid: float | None) -> None:
        """Warn once when three validations in a row get worse while training keeps getting better."""
        if valid is None or self._smoothed_train is None or self._warned_overfitting:
            return
        self._evals.append((valid, self._smoothed_train))
        last = self._evals[-3:]
        if len(last) < 3:
            return
        # Compared as losses: a margin (higher is better) is negated.
        sign = 1 if self._watched.lower_is_better else -1
        (v0, t0), (v1, t1), (v2, t2) = ((sign * v, sign * t) for v, t in last)
        if v0 < v1 < v2 and t0 > t1 > t2:
            self._warned_overfitting = True
            watched = self._watched
            self.event(
                f"Overfitting: {watched.valid_words} {watched.worse} from {last[0][0]:.4f} to {last[2][0]:.4f} "
                f"while {watched.train_words} {watched.better}. {watched.advice}",
                level="warn",
            )

    def _on_event(self, payload: dict) -> None:
        self.event(payload.get("message", ""), level=payload.get("level", "info"))

    def _on_checkpoint(self, payload: dict) -> None:
        self.flush()
        # Before its row exists: a run resumed on another machine fetches it from the store by that row.
        store().publish(payload["path"])
        with transaction.atomic():
            if not self._holds():
                return
            checkpoint, _ = Checkpoint.objects.update_or_create(
                job=self.job,
                step=payload["step"],
                defaults={"path": str(Path(payload["path"]).resolve()), "metrics": payload.get("metrics") or {}},
            )
        self.event(f"Checkpoint saved at step {checkpoint.step}.")
        publish(self.job.public_id, {"type": "checkpoint", "step": checkpoint.step, "id": checkpoint.public_id})

    def _on_checkpoint_removed(self, payload: dict) -> None:
        # The engine keeps its newest checkpoints (and the best); a removed one's id must stop resolving.
        self.flush()
        paths: list[str] = []
        with transaction.atomic():
            if self._holds():
                removed = Checkpoint.objects.filter(job=self.job, step=payload["step"])
                paths = list(removed.values_list("path", flat=True))
                removed.delete()
        for path in paths:
            store().forget(path)

    def _on_summary(self, payload: dict) -> None:
        self.summary = payload
        if not self.lost:
            self.trackers.summarize(payload)

    def open_trackers(self, *, resume_step: int | None) -> None:
        """Start recording to the job's experiment trackers; a resumed job continues the runs it started."""
        job = self.job
        if not job.trackers:
            return
        wandb = next((item["wandb"] for item in job.integrations or [] if item.get("type") == "wandb"), {})
        params = {k: v for k, v in _run_params(job).items() if v is not None}
        tags = ["finetune-console", job.base_model[:64], job.public_id]
        where = self.trackers.start(
            job.trackers,
            lambda name: RunInfo(
                job_id=job.public_id,
                name=job.suffix or job.public_id,
                folder=Path(job.output_dir) / "trackers",
                params=params,
                tags=tags,
                resume_step=resume_step,
                previous=(job.tracking or {}).get(name) or {},
                wandb=wandb,
            ),
        )
        if not where:
            return
        job.tracking = {**(job.tracking or {}), **where}
        with transaction.atomic():
            if self._holds():
                FineTuningJob.objects.filter(pk=job.pk).update(tracking=job.tracking)

    def close_trackers(self, outcome: str) -> None:
        """Flush and close the trackers however the run ended (succeeded, failed, cancelled, paused, lost)."""
        self.trackers.close(outcome)
        folder = Path(self.job.output_dir) / "trackers"
        if folder.is_dir():  # TensorBoard and offline W&B files, for whoever reads them on another machine
            try:
                store().publish(folder)
            except StoreError as exc:
                self.event(f"The trackers' files stay on this machine only: {exc}", level="warn")

    def event(self, message: str, *, level: str = "info") -> None:
        """Write a message event now and show it live."""
        # The engine names files by their path on the worker; users know the run, not the disk.
        for folder in {str(self.job.output_dir), str(Path(self.job.output_dir).resolve())}:
            message = message.replace(folder + "/", "").replace(folder, "the run's folder")
        with transaction.atomic():
            if not self._holds():
                return
            row = JobEvent.objects.create(job=self.job, level=level, message=message)
        publish(
            self.job.public_id,
            {"type": "event", "level": level, "message": message, "created_at": int(row.created_at.timestamp())},
        )

    def _holds(self) -> bool:
        """Whether the job is still this run's; once it is not, it never is again."""
        if not self.lost and not transitions.holds(self.job.pk, worker=self.worker, attempt=self.attempt):
            log.warning(
                "job %s: attempt %s of %s no longer holds the job; its writes stop",
                self.job.public_id,
                self.attempt,
                self.worker,
            )
            self.lost = True
        return not self.lost

    def _maybe_flush(self) -> None:
        if len(self._pending) >= _FLUSH_ROWS or time.monotonic() - self._last_flush >= _FLUSH_SECONDS:
            self.flush()

    def discard(self) -> None:
        """Drop what is not written yet: this run no longer owns the job."""
        self._pending, self._progress = [], None

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending and not self._progress:
            return
        with transaction.atomic():
            if not self._holds():
                self.discard()
                return
            JobEvent.objects.bulk_create(self._pending)
            if self._progress:
                eta = self._progress.get("eta_s")
                FineTuningJob.objects.filter(pk=self.job.pk).update(
                    step=self._progress["step"],
                    total_steps=self._progress.get("total_steps") or 0,
                    trained_tokens=self._progress.get("tokens"),
                    estimated_finish=timezone.now() + timedelta(seconds=eta) if eta is not None else None,
                )
        self._pending = []
        if self._progress:
            publish(
                self.job.public_id,
                {
                    "type": "progress",
                    "step": self._progress["step"],
                    "total_steps": self._progress.get("total_steps"),
                    "eta_s": self._progress.get("eta_s"),
                },
            )


def _run_params(job: FineTuningJob) -> dict:
    """What trackers record as the run's parameters: the job's settings and its resolved hyperparameters."""
    return {
        "job_id": job.public_id,
        "model": job.init_model or job.base_model,
        "base_model": job.base_model,
        "method": job.method,
        "objective": job.objective,
        "training_file": job.training_file_ref,
        "validation_file": job.validation_file_ref or None,
        "seed": job.seed,
        "suffix": job.suffix or None,
        **(job.resolved or {}),
    }


def _control_key(job_pk: int) -> str:
    return f"ft:job-control:{job_pk}"


def _redis(read_timeout: float):
    """A Redis client that gives up quickly: a wake-up is a courtesy, never worth a stall."""
    return sync_client(socket_timeout=read_timeout, connect_timeout=1)


def _push_wake(job_pk: int, client=None) -> None:
    try:
        client = client or _redis(2)
        client.pipeline().rpush(_control_key(job_pk), 1).expire(_control_key(job_pk), 300).execute()
    except (redis.RedisError, OSError):  # a missed wake-up costs one poll interval, nothing else
        log.warning("could not wake the watchdog of job %s; it will see the change at its next poll", job_pk)


def wake_watchdog(job_pk: int) -> None:
    """After this transaction commits, tell the job's watchdog to read its control now.

    The database stays the one source of truth; this only spares the watchdog's
    wait, so a cancel or pause reaches the engine within one step, not one poll.
    Without Redis the watchdog still finds it at its next poll.
    """
    transaction.on_commit(lambda: _push_wake(job_pk))


class Watchdog:
    """Keeps the job's heartbeat fresh and brings the user's cancel/pause to the engine."""

    def __init__(
        self,
        job: FineTuningJob,
        *,
        heartbeat_seconds: float,
        poll_seconds: float = 1.0,
        timeout_seconds: float | None = None,
    ):
        self.job_pk = job.pk
        self.worker, self.attempt = job.worker, job.attempts
        self.lost = False
        """True once the job is no longer this run's (re-queued after a lapsed heartbeat, or deleted), or
        once the database could not confirm it was for longer than the heartbeat timeout."""
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds if timeout_seconds is not None else settings.FT_HEARTBEAT_TIMEOUT
        self.control = ""
        self._redis = None
        self._redis_broken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{job.public_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._redis is not None and not self._redis_broken:
            _push_wake(self.job_pk)  # end its wait now rather than after a poll interval
        self._thread.join(timeout=10)

    def should_stop(self):
        return self.control or None

    def _run(self) -> None:
        last_beat = 0.0
        confirmed = time.monotonic()  # when the database last said the job is this run's
        failures = 0
        try:
            while not self._stop.is_set() and not self.lost:
                try:
                    now = time.monotonic()
                    if now - last_beat >= self.heartbeat_seconds:
                        transitions.heartbeat(self.job_pk, worker=self.worker, attempt=self.attempt)
                        last_beat = now
                    row = (
                        FineTuningJob.objects.filter(pk=self.job_pk)
                        .values_list("control", "status", "worker", "attempts")
                        .first()
                    )
                except DatabaseError as error:
                    # A database hiccup must not end the watch: cancel, pause and the heartbeat
                    # depend on it. Back off and retry; past the heartbeat timeout, stop the run,
                    # since recovery may by then have handed the job to another worker.
                    failures += 1
                    connections.close_all()  # the next query opens a fresh connection
                    if time.monotonic() - confirmed > self.timeout_seconds:
                        log.error(
                            "job %s: the database has not answered for %.0f s; stopping the run",
                            self.job_pk,
                            time.monotonic() - confirmed,
                        )
                        self.lost, self.control = True, "cancel"
                        return
                    log.warning("job %s: the watchdog could not reach the database (%s); retrying", self.job_pk, error)
                    self._stop.wait(min(self.poll_seconds * 2**failures, self.heartbeat_seconds))
                    continue
                failures = 0
                if row is None or row[1] != FineTuningJob.RUNNING or (row[2], row[3]) != (self.worker, self.attempt):
                    # A stalled run whose job was re-queued must stop, or two would train it.
                    self.lost, self.control = True, "cancel"
                    return
                confirmed = time.monotonic()
                self.control = row[0] or ""
                self._wait()
        finally:
            connections.close_all()
            if self._redis is not None:
                self._redis.close()

    def _wait(self) -> None:
        """Sleep one poll interval, or less when wake_watchdog() is called for this job."""
        if self._stop.is_set():
            return
        if not self._redis_broken:
            try:
                if self._redis is None:
                    self._redis = _redis(self.poll_seconds + 5)
                self._redis.blpop([_control_key(self.job_pk)], timeout=self.poll_seconds)
                return
            except (redis.RedisError, OSError):  # no Redis: from now on poll the database only
                log.warning(
                    "the watchdog of job %s cannot reach Redis; it polls the database every %s s",
                    self.job_pk,
                    self.poll_seconds,
                )
                self._redis_broken = True
        self._stop.wait(self.poll_seconds)
