"""Reads for jobs: lists, the curve history, chart figures."""

from .hyperparameters import described_settings
from .models import Checkpoint, FineTuningJob, JobEvent

SMOOTHING = 0.9


def jobs_for(user):
    return FineTuningJob.objects.owned_by(user).select_related("training_file", "validation_file")


def job_for(user, public_id: str) -> FineTuningJob | None:
    return jobs_for(user).filter(public_id=public_id).first()


def annotate_queue_positions(jobs: list[FineTuningJob]) -> None:
    """Set `queue_position` on each queued job of the list (one query for all)."""
    queued = list(
        FineTuningJob.objects.filter(status=FineTuningJob.QUEUED)
        .order_by("queued_at", "pk")
        .values_list("pk", flat=True)
    )
    positions = {pk: i + 1 for i, pk in enumerate(queued)}
    for job in jobs:
        job.queue_position = positions.get(job.pk)


def queue_position(job: FineTuningJob) -> int | None:
    """1 for the next job a training worker takes, None if the job is not queued."""
    annotate_queue_positions([job])
    return job.queue_position


def message_events(job: FineTuningJob, limit: int = 200):
    return list(job.events.filter(type=JobEvent.MESSAGE).order_by("-id")[:limit])


def metric_points(job: FineTuningJob) -> list[dict]:
    return [e.data for e in job.events.filter(type=JobEvent.METRICS).order_by("step", "id") if e.data]


def checkpoint_for_model_id(user, model_id: str) -> Checkpoint | None:
    """The checkpoint behind `ft:...:ckpt-step-N`, if the user owns it."""
    head, sep, step = model_id.rpartition(":ckpt-step-")
    if not sep or not (step.isascii() and step.isdigit()) or len(step) > 18:  # "²" is a digit to isdigit()
        return None
    short_id = head.rsplit(":", 1)[-1]
    for job in FineTuningJob.objects.owned_by(user).filter(public_id__endswith=short_id).select_related("owner"):
        if job.fine_tuned_model_id == head:
            return job.checkpoints.filter(step=int(step)).select_related("job").first()
    return None


def _layout(y_title: str, height: int = 260) -> dict:
    return {
        "margin": {"l": 55, "r": 10, "t": 10, "b": 40},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": y_title}},
        "legend": {"orientation": "h", "y": -0.3},
        "height": height,
    }


def _trace(name: str, points: list[dict], key: str, color: str, **extra) -> dict:
    rows = [p for p in points if p.get(key) is not None]
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": [p["step"] for p in rows],
        "y": [p[key] for p in rows],
        "line": {"color": color},
        **extra,
    }


def smoothed_losses(points: list[dict]) -> list[float]:
    """Exponential moving average of the train loss (the curve's smoothed trace)."""
    smoothed, running = [], None
    for p in points:
        if p.get("train_loss") is None:
            continue
        running = p["train_loss"] if running is None else SMOOTHING * running + (1 - SMOOTHING) * p["train_loss"]
        smoothed.append(running)
    return smoothed


def job_figures(points: list[dict]) -> dict:
    """The job page's charts as Plotly figures; the page script extends them live.

    Trace order is part of the contract with static/js/job.js.
    """
    train = [p for p in points if p.get("train_loss") is not None]
    loss = {
        "data": [
            _trace("train loss", train, "train_loss", "rgba(37,99,235,0.35)"),
            {
                **_trace(
                    "train loss (smoothed)",
                    train,
                    "train_loss",
                    "#2563eb",
                ),
                "y": smoothed_losses(train),
                "line": {"color": "#2563eb", "width": 2},
            },
            _trace("validation loss", points, "valid_loss", "#dc2626", mode="lines+markers"),
        ],
        "layout": _layout("loss", 320),
    }
    return {
        "loss": loss,
        "accuracy": {
            "data": [
                _trace("train token accuracy", points, "train_mean_token_accuracy", "#2563eb"),
                _trace(
                    "validation token accuracy", points, "valid_mean_token_accuracy", "#dc2626", mode="lines+markers"
                ),
            ],
            "layout": _layout("token accuracy"),
        },
        "lr": {
            "data": [_trace("learning rate", points, "learning_rate", "#7c3aed")],
            # "2e-4" as people write learning rates, not Plotly's SI "200µ".
            "layout": {**_layout("learning rate"), "yaxis": {"title": {"text": "learning rate"}, "tickformat": ".1~e"}},
        },
        "grad_norm": {
            "data": [_trace("gradient norm", points, "grad_norm", "#059669")],
            "layout": _layout("gradient norm"),
        },
        "throughput": {
            "data": [_trace("tokens / s", points, "tokens_per_second", "#d97706")],
            "layout": _layout("tokens per second"),
        },
        "smoothing": SMOOTHING,
    }


def metrics_csv_rows(job: FineTuningJob):
    """Header then one row per logged point, for the CSV download."""
    columns = [
        "step",
        "epoch",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "learning_rate",
        "grad_norm",
        "trained_tokens",
        "tokens_per_second",
        "elapsed_time",
    ]
    yield columns
    for point in metric_points(job):
        yield [point.get(c, "") if point.get(c) is not None else "" for c in columns]


def warnings_of(job: FineTuningJob, limit: int = 3):
    return list(job.events.filter(type=JobEvent.MESSAGE, level="warn").order_by("-id")[:limit])


_PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"]


def compare_figure(jobs: list[FineTuningJob]) -> dict:
    """Smoothed train loss (solid) and validation loss (dotted) of several jobs on one chart."""
    data = []
    for i, job in enumerate(jobs):
        color = _PALETTE[i % len(_PALETTE)]
        points = metric_points(job)
        train = [p for p in points if p.get("train_loss") is not None]
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"{job.display_name} train",
                "x": [p["step"] for p in train],
                "y": smoothed_losses(train),
                "line": {"color": color},
            }
        )
        data.append(
            {
                **_trace(f"{job.display_name} validation", points, "valid_loss", color),
                "line": {"color": color, "dash": "dot"},
            }
        )
    return {"data": data, "layout": _layout("loss", 380)}


def settings_diff(jobs: list[FineTuningJob]) -> list[dict]:
    """One row per setting, marking the ones that differ between the jobs."""

    def settings_of(job):
        """label -> (the value compared, the value shown): 0.031 and 0.034 differ even if shown alike."""
        plain = {
            "Base model": job.base_model,
            "Method": job.method,
            "Training file": job.training_file_ref,
            "Validation file": job.validation_file_ref or "—",
            "Seed": job.seed,
        }
        shown = described_settings(job.resolved, validation=has_validation(job))
        return {
            **{k: (v, v) for k, v in plain.items()},
            **{label: (raw, text) for (label, text), raw in zip(shown, (job.resolved or {}).values(), strict=False)},
        }

    all_settings = [settings_of(job) for job in jobs]
    keys = list(dict.fromkeys(k for s in all_settings for k in s))
    missing = (None, "—")
    return [
        {
            "name": k,
            "values": [s.get(k, missing)[1] for s in all_settings],
            "differs": len({repr(s.get(k, missing)[0]) for s in all_settings}) > 1,
        }
        for k in keys
    ]


def has_validation(job: FineTuningJob) -> bool:
    """Whether the run evaluates: a validation file, or a share held out for one."""
    return bool(job.validation_file_ref or job.holdout_percent)
