"""Celery entry points for evaluations: each fetches by id and calls one service."""

from celery import shared_task

from . import services


@shared_task(name="evals_app.tasks.run_eval", acks_late=False)
def run_eval(run_id: int) -> None:
    services.run_execute(run_id=run_id)


@shared_task(name="evals_app.tasks.reconcile_eval_runs")
def reconcile_eval_runs() -> list[str]:
    return services.reconcile_runs()
