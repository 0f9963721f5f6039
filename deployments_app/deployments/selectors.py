"""Reads for deployments: lists, the deployment chat routes to, usage and costs."""

from django.conf import settings

from ..models import Deployment, Instance


def deployments_for(user):
    return Deployment.objects.owned_by(user)


def deployment_for(user, public_id: str) -> Deployment | None:
    return deployments_for(user).filter(public_id=public_id).first()


def serving_deployment(user, model_id: str) -> Deployment | None:
    """The user's active deployment of model_id with a running instance, if any (chat routes to it)."""
    return (
        deployments_for(user)
        .active()
        .filter(model_id=model_id, instance_set__status=Instance.RUNNING)
        .order_by("-id")
        .first()
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
