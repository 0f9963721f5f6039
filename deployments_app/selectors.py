"""Reads for model cards and deployments: lists, usage, costs and chart data."""

from django.conf import settings

from .models import Deployment, Instance


RECENT_CHECKPOINTS = 50
"""Checkpoints offered in model pickers, newest first; a requested one is always added."""


def model_choices(user, wanted=()) -> list[str]:
    """Model ids the user may pick: ready base models, their fine-tuned models, recent checkpoints,
    and each id in `wanted` that resolves for them (a link from an older checkpoint must not
    silently open another model)."""
    from jobs_app.models import Checkpoint

    from .catalog import base_models, resolve_model
    from .models import ModelCard

    checkpoints = Checkpoint.objects.filter(job__owner=user).select_related("job__owner")[:RECENT_CHECKPOINTS]
    choices = ([b.id for b in base_models() if b.ready] + [c.model_id for c in ModelCard.objects.owned_by(user)]
               + [c.model_id for c in checkpoints if c.model_id])
    for model_id in wanted:
        if model_id and model_id not in choices and resolve_model(user, model_id) is not None:
            choices.append(model_id)
    return choices


def deployments_for(user):
    return Deployment.objects.owned_by(user)


def deployment_for(user, public_id: str) -> Deployment | None:
    return deployments_for(user).filter(public_id=public_id).first()


def serving_deployment(user, model_id: str) -> Deployment | None:
    """The user's active deployment of model_id with a running instance, if any (chat routes to it)."""
    return (
        deployments_for(user).active().filter(model_id=model_id, instance_set__status=Instance.RUNNING)
        .order_by("-id").first()
    )


def deployment_usage(deployment: Deployment, instances: list[Instance] | None = None) -> dict:
    """Totals over every instance the deployment ever had, with the cost estimate."""
    instances = list(deployment.instance_set.all()) if instances is None else instances
    hours = sum(i.hours for i in instances)
    busy = sum(i.busy_seconds for i in instances)
    tokens = sum(i.tokens_generated for i in instances)
    return {
        "running_instances": sum(1 for i in instances if i.status == Instance.RUNNING),
        "requests_served": sum(i.requests_served for i in instances),
        "tokens_generated": tokens,
        "errors": sum(i.errors for i in instances),
        "tokens_per_second": tokens / busy if busy else None,
        "instance_hours": hours,
        "hour_price": settings.FT_INSTANCE_HOUR_PRICE,
        "estimated_cost": hours * settings.FT_INSTANCE_HOUR_PRICE,
    }


def deployment_status_by_model(user) -> dict[str, list[Deployment]]:
    """Active deployments of the user, grouped by model id (for the model cards)."""
    grouped: dict[str, list[Deployment]] = {}
    for deployment in deployments_for(user).active():
        grouped.setdefault(deployment.model_id, []).append(deployment)
    return grouped


_THUMBNAIL_LAYOUT = {"height": 130, "margin": {"l": 35, "r": 5, "t": 5, "b": 20}, "showlegend": False,
                     "xaxis": {"title": {"text": ""}}, "yaxis": {"title": {"text": ""}}}


def loss_thumbnail(job) -> dict | None:
    """The job's loss curve (train smoothed and validation) as a small static figure."""
    from jobs_app.selectors import job_figures, metric_points

    points = metric_points(job) if job else []
    if not points:
        return None
    figure = job_figures(points)["loss"]
    return {"data": figure["data"][1:], "layout": {**figure["layout"], **_THUMBNAIL_LAYOUT}}


# What a model card shows of its settings and results, under short names.
_SHOWN_HYPERPARAMETERS = {"n_epochs": "epochs", "batch_size": "batch", "learning_rate": "lr", "lora_rank": "LoRA rank",
                          "lora_alpha": "alpha", "max_seq_len": "max length"}
_SHOWN_METRICS = {"final_train_loss": "train loss", "eval_loss": "validation loss", "eval_token_accuracy": "validation accuracy"}


def model_square(user) -> list[dict]:
    """What each fine-tuned model card shows: provenance, settings, curve, evaluation, deployments."""
    from .exports import merged_state
    from .models import ModelCard
    from .services import export_dir

    deployments = deployment_status_by_model(user)
    cards = []
    for card in ModelCard.objects.owned_by(user).select_related("job__training_file", "job__validation_file"):
        job = card.job
        cards.append({
            "card": card,
            "job": job,
            "training_file": getattr(job, "training_file", None) if job else None,
            "validation_file": getattr(job, "validation_file", None) if job else None,
            "hyperparameters": [(label, card.hyperparameters[k]) for k, label in _SHOWN_HYPERPARAMETERS.items() if k in card.hyperparameters],
            "evaluation": [(label, card.metrics[k]) for k, label in _SHOWN_METRICS.items() if card.metrics.get(k) is not None],
            "thumbnail": loss_thumbnail(job),
            "thumbnail_id": f"loss-{card.pk}",
            "deployments": deployments.get(card.model_id, []),
            "merged": merged_state(export_dir(card)) if card.is_adapter else None,
        })
    return cards
