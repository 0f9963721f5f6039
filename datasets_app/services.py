"""Writes for datasets: store an upload, validate it in the background, delete."""

import logging
import os
import tempfile

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Q

from finetune_site.api_errors import ApiError

from .models import Dataset

log = logging.getLogger(__name__)


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@transaction.atomic
def dataset_create(*, owner, upload, purpose: str = "fine-tune", filename: str | None = None) -> Dataset:
    """Store an uploaded file and queue its validation."""
    if purpose != "fine-tune":
        raise ApiError(f"purpose must be 'fine-tune', got {purpose!r}.", param="purpose")
    if upload is None:
        raise ApiError("No file was uploaded (multipart field 'file').", param="file")
    limit = settings.FT_MAX_UPLOAD_BYTES
    if upload.size > limit:
        raise ApiError(
            f"File is {_human_bytes(upload.size)}, over the limit of {_human_bytes(limit)} (FT_MAX_UPLOAD_BYTES).",
            param="file", status_code=413, code="file_too_large",
        )
    name = os.path.basename(filename or upload.name or "upload") or "upload"
    dataset = Dataset(owner=owner, filename=name[:255], purpose=purpose, bytes=upload.size)
    # Django streams the upload to storage in chunks, never the whole file in memory.
    dataset.file.save(f"{dataset.public_id}.jsonl", upload, save=False)
    dataset.save()
    from .tasks import validate_dataset

    transaction.on_commit(lambda: validate_dataset.delay(dataset.pk))
    return dataset


def dataset_validate(*, dataset_id: int) -> Dataset | None:
    """Validate a stored file line by line; write its normalized chat lines beside it."""
    from .validation import validate_stream

    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None or dataset.status != Dataset.UPLOADED:
        return dataset
    try:
        with tempfile.TemporaryFile() as normalized, dataset.file.open("rb") as source:
            report = validate_stream(source, out=normalized)
            if report.ok:
                normalized.seek(0)
                dataset.normalized.save(f"{dataset.public_id}.chat.jsonl", File(normalized), save=False)
    except Exception as exc:  # noqa: BLE001 - a broken file must end as an error, not a stuck upload
        log.exception("validation of %s crashed", dataset.public_id)
        dataset.mark_error(f"The file could not be read: {type(exc).__name__}: {exc}")
        return dataset
    if report.ok:
        dataset.mark_processed(examples=report.examples, fmt=report.format, report=report.to_dict(), details=report.summary_text() if report.warnings else "")
    else:
        dataset.mark_error(report.summary_text(), report=report.to_dict())
    return dataset


@transaction.atomic
def dataset_delete(*, dataset: Dataset) -> None:
    """Delete a dataset and its files, unless a queued or running job still needs it."""
    from jobs_app.models import FineTuningJob

    using = FineTuningJob.objects.filter(Q(training_file=dataset) | Q(validation_file=dataset))
    blocking = using.filter(status__in=FineTuningJob.ACTIVE_STATUSES + (FineTuningJob.PAUSED,)).first()
    if blocking is not None:
        raise ApiError(
            f"File {dataset.public_id} is used by job {blocking.public_id} ({blocking.status}); cancel the job first.",
            code="file_in_use",
        )
    files = [f for f in (dataset.file, dataset.normalized) if f]
    dataset.delete()
    transaction.on_commit(lambda: [f.storage.delete(f.name) for f in files])
