"""Reads for jobs: lists, the curve history, chart figures."""

from .models import Checkpoint, FineTuningJob, JobEvent

_SMOOTHING = 0.9


def jobs_for(user):
    return FineTuningJob.objects.owned_by(user).select_related("training_file", "validation_file")


def job_for(user, public_id: str) -> FineTuningJob | None:
    return jobs_for(user).filter(public_id=public_id).first()


def queue_position(job: FineTuningJob) -> int | None:
    """1 for the next job a training worker takes, None if the job is not queued."""
    if job.status != FineTuningJob.QUEUED:
        return None
    return FineTuningJob.objects.filter(status=FineTuningJob.QUEUED, pk__lte=job.pk).count()


def message_events(job: FineTuningJob, limit: int = 200):
    return list(job.events.filter(type=JobEvent.MESSAGE).order_by("-id")[:limit])


def metric_points(job: FineTuningJob) -> list[dict]:
    return [e.data for e in job.events.filter(type=JobEvent.METRICS).order_by("step", "id") if e.data]


def checkpoint_for_model_id(user, model_id: str) -> Checkpoint | None:
    """The checkpoint behind `ft:...:ckpt-step-N`, if the user owns it."""
    head, sep, step = model_id.rpartition(":ckpt-step-")
    if not sep or not step.isdigit():
        return None
    short_id = head.rsplit(":", 1)[-1]
    for job in FineTuningJob.objects.owned_by(user).filter(public_id__endswith=short_id).select_related("owner"):
        if job.fine_tuned_model_id == head:
            return job.checkpoints.filter(step=int(step)).select_related("job").first()
    return None


def loss_figure(points: list[dict]) -> dict:
    """A Plotly figure of train loss (raw and smoothed) and validation loss."""
    train = [p for p in points if p.get("train_loss") is not None]
    valid = [p for p in points if p.get("valid_loss") is not None]
    smoothed, running = [], None
    for p in train:
        running = p["train_loss"] if running is None else _SMOOTHING * running + (1 - _SMOOTHING) * p["train_loss"]
        smoothed.append(running)
    return {
        "data": [
            {"type": "scatter", "mode": "lines", "name": "train loss", "x": [p["step"] for p in train],
             "y": [p["train_loss"] for p in train], "line": {"color": "rgba(37,99,235,0.35)"}},
            {"type": "scatter", "mode": "lines", "name": "train loss (smoothed)", "x": [p["step"] for p in train],
             "y": smoothed, "line": {"color": "#2563eb", "width": 2}},
            {"type": "scatter", "mode": "lines+markers", "name": "validation loss", "x": [p["step"] for p in valid],
             "y": [p["valid_loss"] for p in valid], "line": {"color": "#dc2626"}},
        ],
        "layout": {
            "margin": {"l": 50, "r": 10, "t": 10, "b": 40},
            "xaxis": {"title": {"text": "step"}},
            "yaxis": {"title": {"text": "loss"}},
            "legend": {"orientation": "h", "y": -0.25},
            "height": 320,
        },
        "smoothing": _SMOOTHING,
    }
