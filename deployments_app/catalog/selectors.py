"""Reads for the model catalog: the models a user may pick, and what each Model Square card shows."""

from jobs_app.models import Checkpoint, FineTuningJob
from jobs_app.selectors import job_figures, metric_points

from ..deployments.selectors import deployment_status_by_model
from ..models import ModelCard
from .exports import merged_state
from .resolution import base_models, resolve_model
from .services import export_dir

RECENT_CHECKPOINTS = 50
"""Checkpoints offered in model pickers, newest first; a requested one is always added."""


def model_choices(user, wanted=()) -> list[str]:
    """Model ids the user may pick: ready base models, their fine-tuned models, recent checkpoints,
    and each id in `wanted` that resolves for them (a link from an older checkpoint must not
    silently open another model)."""

    checkpoints = Checkpoint.objects.filter(job__owner=user).select_related("job__owner")[:RECENT_CHECKPOINTS]
    choices = (
        [b.id for b in base_models() if b.ready]
        + [c.model_id for c in ModelCard.objects.owned_by(user)]
        + [c.model_id for c in checkpoints if c.model_id]
    )
    for model_id in wanted:
        if model_id and model_id not in choices and resolve_model(user, model_id) is not None:
            choices.append(model_id)
    return choices


_THUMBNAIL_LAYOUT = {
    "height": 130,
    "margin": {"l": 35, "r": 5, "t": 5, "b": 20},
    "showlegend": False,
    "xaxis": {"title": {"text": ""}},
    "yaxis": {"title": {"text": ""}},
}


def loss_thumbnail(job) -> dict | None:
    """The job's loss curve (train smoothed and validation) as a small static figure."""

    points = metric_points(job) if job else []
    if not points:
        return None
    figure = job_figures(points)["loss"]
    return {"data": figure["data"][1:], "layout": {**figure["layout"], **_THUMBNAIL_LAYOUT}}


# What a model card shows of its settings and results, under short names.
_SHOWN_HYPERPARAMETERS = {
    "n_epochs": "epochs",
    "batch_size": "batch",
    "learning_rate": "lr",
    "lora_rank": "LoRA rank",
    "lora_alpha": "alpha",
    "max_seq_len": "max length",
    "beta": "beta",
}
_SHOWN_METRICS = {
    "final_train_loss": "train loss",
    "eval_loss": "validation loss",
    "eval_token_accuracy": "validation accuracy",
    "final_reward_accuracy": "reward accuracy",
    "eval_reward_accuracy": "validation reward accuracy",
    "eval_reward_margin": "validation reward margin",
}
OBJECTIVE_LABELS = dict(FineTuningJob.OBJECTIVE_CHOICES)


def model_square(user) -> list[dict]:
    """What each fine-tuned model card shows: provenance, settings, curve, evaluation, deployments."""
    deployments = deployment_status_by_model(user)
    cards = []
    for card in ModelCard.objects.owned_by(user).select_related("job__training_file", "job__validation_file"):
        job = card.job
        cards.append(
            {
                "card": card,
                "job": job,
                "objective": OBJECTIVE_LABELS.get(card.objective, card.objective),
                "training_file": getattr(job, "training_file", None) if job else None,
                "validation_file": getattr(job, "validation_file", None) if job else None,
                "hyperparameters": [
                    (label, card.hyperparameters[k])
                    for k, label in _SHOWN_HYPERPARAMETERS.items()
                    if k in card.hyperparameters
                ],
                "evaluation": [
                    (label, card.metrics[k]) for k, label in _SHOWN_METRICS.items() if card.metrics.get(k) is not None
                ],
                "thumbnail": loss_thumbnail(job),
                "thumbnail_id": f"loss-{card.pk}",
                "deployments": deployments.get(card.model_id, []),
                "merged": merged_state(export_dir(card)) if card.is_adapter else None,
            }
        )
    return cards
