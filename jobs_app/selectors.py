"""Reads for jobs: lists, the curve history, chart figures."""

from .hyperparameters import described_settings
from .models import Checkpoint, FineTuningJob, JobEvent
from .publish import DPO_METRICS

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


def _trace(name: str, points: list[dict], key: str, color: str, *, live: str | None = None, **extra) -> dict:
    """A line of points[key] by step; live ("metric" or "eval") says which live message extends it."""
    rows = [p for p in points if p.get(key) is not None]
    trace = {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": [p["step"] for p in rows],
        "y": [p[key] for p in rows],
        "line": {"color": color},
        **extra,
    }
    if live:
        trace["meta"] = {"key": key, "live": live}  # read by static/js/job.js, ignored by Plotly
    return trace


def _pair(title: str, points: list[dict], key: str, *, train_color="#2563eb", valid_color="#dc2626") -> list[dict]:
    """The train_ and valid_ lines of one metric: train live from metrics, validation from evals."""
    return [
        _trace(f"train {title}", points, f"train_{key}", train_color, live="metric"),
        _trace(f"validation {title}", points, f"valid_{key}", valid_color, live="eval", mode="lines+markers"),
    ]


def smoothed_losses(points: list[dict]) -> list[float]:
    """Exponential moving average of the train loss (the curve's smoothed trace)."""
    smoothed, running = [], None
    for p in points:
        if p.get("train_loss") is None:
            continue
        running = p["train_loss"] if running is None else SMOOTHING * running + (1 - SMOOTHING) * p["train_loss"]
        smoothed.append(running)
    return smoothed


CHART_TITLES = {
    FineTuningJob.SFT: {
        "accuracy": "Token accuracy",
        "lr": "Learning rate",
        "grad_norm": "Gradient norm",
        "throughput": "Tokens per second",
    },
    FineTuningJob.DPO: {
        "reward_accuracy": "Reward accuracy",
        "reward_margin": "Reward margin",
        "rewards": "Rewards of chosen and rejected",
        "logps": "Log-probabilities of chosen and rejected",
        "lr": "Learning rate",
        "grad_norm": "Gradient norm",
        "throughput": "Tokens per second",
    },
}
"""The job page's small charts below the loss, per objective, in the order shown."""


def job_figures(points: list[dict], objective: str = FineTuningJob.SFT) -> dict:
    """The job page's charts as Plotly figures; the page script extends them live.

    Each live trace names, in its `meta`, the point key and the message ("metric" or
    "eval") that extends it; the loss chart's first three traces are train, smoothed
    train and validation loss (static/js/job.js and the model thumbnails rely on it).
    """
    train = [p for p in points if p.get("train_loss") is not None]
    loss_word = "DPO loss" if objective == FineTuningJob.DPO else "loss"
    loss = {
        "data": [
            _trace(f"train {loss_word}", train, "train_loss", "rgba(37,99,235,0.35)", live="metric"),
            {
                **_trace(f"train {loss_word} (smoothed)", train, "train_loss", "#2563eb"),
                "y": smoothed_losses(train),
                "line": {"color": "#2563eb", "width": 2},
                "meta": {"key": "train_loss", "live": "metric", "smoothed": True},
            },
            _trace(f"validation {loss_word}", points, "valid_loss", "#dc2626", live="eval", mode="lines+markers"),
        ],
        "layout": _layout(loss_word, 320),
    }
    figures = {
        "loss": loss,
        "lr": {
            "data": [_trace("learning rate", points, "learning_rate", "#7c3aed", live="metric")],
            # "2e-4" as people write learning rates, not Plotly's SI "200µ".
            "layout": {**_layout("learning rate"), "yaxis": {"title": {"text": "learning rate"}, "tickformat": ".1~e"}},
        },
        "grad_norm": {
            "data": [_trace("gradient norm", points, "grad_norm", "#059669", live="metric")],
            "layout": _layout("gradient norm"),
        },
        "throughput": {
            "data": [_trace("tokens / s", points, "tokens_per_second", "#d97706", live="metric")],
            "layout": _layout("tokens per second"),
        },
        "smoothing": SMOOTHING,
    }
    if objective == FineTuningJob.DPO:
        figures.update(_dpo_figures(points))
    else:
        figures["accuracy"] = {
            "data": [
                _trace("train token accuracy", points, "train_mean_token_accuracy", "#2563eb", live="metric"),
                _trace(
                    "validation token accuracy",
                    points,
                    "valid_mean_token_accuracy",
                    "#dc2626",
                    live="eval",
                    mode="lines+markers",
                ),
            ],
            "layout": _layout("token accuracy"),
        }
    return figures


def _dpo_figures(points: list[dict]) -> dict:
    """A DPO run's reward accuracy, reward margin, rewards and log-probabilities of chosen and rejected."""
    chosen, rejected = "#059669", "#dc2626"
    both = []
    for key in ("rewards", "logps"):
        both.append(
            [
                _trace("train chosen", points, f"train_{key}_chosen", chosen, live="metric"),
                _trace("train rejected", points, f"train_{key}_rejected", rejected, live="metric"),
                _trace(
                    "validation chosen",
                    points,
                    f"valid_{key}_chosen",
                    chosen,
                    live="eval",
                    mode="lines+markers",
                    line={"color": chosen, "dash": "dot"},
                ),
                _trace(
                    "validation rejected",
                    points,
                    f"valid_{key}_rejected",
                    rejected,
                    live="eval",
                    mode="lines+markers",
                    line={"color": rejected, "dash": "dot"},
                ),
            ]
        )
    accuracy_layout = _layout("share of pairs")
    accuracy_layout["yaxis"]["range"] = [0, 1.02]
    return {
        "reward_accuracy": {"data": _pair("reward accuracy", points, "reward_accuracy"), "layout": accuracy_layout},
        "reward_margin": {
            "data": _pair("reward margin", points, "reward_margin"),
            "layout": _layout("chosen - rejected"),
        },
        "rewards": {"data": both[0], "layout": _layout("reward")},
        "logps": {"data": both[1], "layout": _layout("log-probability")},
    }


def chart_panels(objective: str) -> list[tuple[str, str]]:
    """(figure name, title) of the small charts the job page shows for this objective."""
    return list(CHART_TITLES.get(objective, CHART_TITLES[FineTuningJob.SFT]).items())


_CSV_COLUMNS = {
    FineTuningJob.SFT: [
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
    ],
    FineTuningJob.DPO: [
        "step",
        "epoch",
        "train_loss",
        "valid_loss",
        *(f"{split}_{name}" for name in DPO_METRICS for split in ("train", "valid")),
        "learning_rate",
        "grad_norm",
        "trained_tokens",
        "tokens_per_second",
        "elapsed_time",
    ],
}


def metrics_csv_rows(job: FineTuningJob):
    """Header then one row per logged point, for the CSV download (a DPO run's loss is its DPO loss)."""
    columns = _CSV_COLUMNS.get(job.objective, _CSV_COLUMNS[FineTuningJob.SFT])
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
            "Objective": job.get_objective_display(),
            "Starts from": job.init_model or job.base_model,
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
