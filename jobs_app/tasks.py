"""Celery entry points for jobs: each fetches by id and calls one service."""

import socket

from celery import shared_task

from . import services


@shared_task(name="jobs_app.tasks.train_job", acks_late=False)
def train_job(job_id: int) -> None:
    services.job_run(job_id=job_id, worker=f"{socket.gethostname()}:{train_job.request.hostname or ''}")


@shared_task(name="jobs_app.tasks.join_job", acks_late=False)
def join_job(job_id: int, attempt: int, node_rank: int, rendezvous: str, resume_step: int | None) -> None:
    """This machine's ranks of a job that another training worker runs over several machines."""
    services.job_join(
        job_id=job_id,
        attempt=attempt,
        node_rank=node_rank,
        rendezvous=rendezvous,
        resume_step=resume_step,
        worker=f"{socket.gethostname()}:{join_job.request.hostname or ''}",
    )


@shared_task(name="jobs_app.tasks.recover_stale_jobs")
def recover_stale_jobs() -> list[str]:
    """The periodic sweep: jobs whose worker went quiet, then jobs whose task message was lost."""
    return services.recover_stale_jobs() + services.requeue_lost_jobs()


@shared_task(name="jobs_app.tasks.prepare_holdout")
def prepare_holdout(job_id: int, percent: int) -> None:
    services.job_prepare_holdout(job_id=job_id, percent=percent)
