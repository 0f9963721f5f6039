"""Celery tasks of deployments and the catalog: each fetches by id and calls one function.

They stay in this module, under these names, because Celery finds an app's tasks
in `<app>.tasks` and because queued messages, CELERY_TASK_ROUTES and the beat
schedule name them.
"""

import socket

from celery import shared_task
from celery.signals import worker_shutting_down

from .catalog import services as catalog_services
from .deployments import services as deployment_services
from .deployments import supervisor


@shared_task(name="deployments_app.tasks.run_instance", acks_late=False)
def run_instance(instance_id: int) -> None:
    """Run one deployment instance's process and watch it until it ends (long-running, on the serving queue)."""
    supervisor.supervise_instance(instance_id, worker=f"{socket.gethostname()}:{run_instance.request.hostname or ''}")


@shared_task(name="deployments_app.tasks.reconcile_deployments")
def reconcile_deployments() -> dict:
    return deployment_services.reconcile_deployments()


@worker_shutting_down.connect
def _stop_instances_on_shutdown(**kwargs):
    supervisor.host_shutting_down.set()


@shared_task(name="deployments_app.tasks.build_merged_model")
def build_merged_model(card_id: int) -> None:
    catalog_services.model_merge(card_id=card_id)


@shared_task(name="deployments_app.tasks.build_gguf_export")
def build_gguf_export(card_id: int, quant: str) -> None:
    catalog_services.gguf_export(card_id=card_id, quant=quant)
