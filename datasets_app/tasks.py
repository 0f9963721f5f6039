from celery import shared_task

from . import services


@shared_task(name="datasets_app.tasks.validate_dataset")
def validate_dataset(dataset_id: int) -> None:
    services.dataset_validate(dataset_id=dataset_id)


@shared_task(name="datasets_app.tasks.compute_statistics")
def compute_statistics(dataset_id: int) -> None:
    services.dataset_compute_statistics(dataset_id=dataset_id)


@shared_task(name="datasets_app.tasks.derive_datasets")
def derive_datasets(dataset_ids: list[int]) -> None:
    services.dataset_derive(dataset_ids=dataset_ids)


@shared_task(name="datasets_app.tasks.reconcile_datasets")
def reconcile_datasets() -> list[str]:
    return services.datasets_reconcile()
