"""Writes for datasets: store an upload, validate it in the background, delete."""

import hashlib
import logging
import os
import random
import tempfile

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Q

from deployments_app.catalog import tokenizer_path
from finetune_site.errors import InvalidInput, InvalidState, TooLarge
from finetune_site.units import human_bytes
from jobs_app.models import FineTuningJob

from .models import Dataset
from .preview import load_tokenizer
from .token_stats import estimate_cost, token_statistics
from .validation import validate_stream

log = logging.getLogger(__name__)


@transaction.atomic
def dataset_create(*, owner, upload, purpose: str = "fine-tune", filename: str | None = None) -> Dataset:
    """Store an uploaded file and queue its validation."""
    if purpose != "fine-tune":
        raise InvalidInput(f"purpose must be 'fine-tune', got {purpose!r}.", param="purpose")
    if upload is None:
        raise InvalidInput(
            "No file was uploaded (multipart field 'file'). A file part is dropped when its file name is "
            "empty, '.', '..' or not valid UTF-8: give the file a plain name.",
            param="file",
        )
    limit = settings.FT_MAX_UPLOAD_BYTES
    if upload.size > limit:
        raise TooLarge(
            f"File is {human_bytes(upload.size)}, over the limit of {human_bytes(limit)} (FT_MAX_UPLOAD_BYTES).",
            param="file",
            code="file_too_large",
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
    """Validate a stored file line by line; write its normalized chat lines beside it.

    Returns None, quietly, when the dataset is deleted before or while it is validated.
    """
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None or dataset.status != Dataset.UPLOADED:
        return dataset
    try:
        with tempfile.TemporaryFile() as normalized, dataset.file.open("rb") as source:
            report = validate_stream(source, out=normalized)
            if report.ok:
                normalized.seek(0)
                dataset.normalized.save(f"{dataset.public_id}.chat.jsonl", File(normalized), save=False)
    except Exception as exc:  # a broken file must end as an error, not a stuck upload
        if not dataset.mark_error(f"The file could not be read: {type(exc).__name__}: {exc}"):
            return _gone(dataset)
        log.exception("validation of %s crashed", dataset.public_id)
        return dataset
    if report.ok:
        details = report.summary_text() if report.warnings else ""
        if not dataset.mark_processed(
            examples=report.examples, fmt=report.format, report=report.to_dict(), details=details
        ):
            return _gone(dataset)
        from .tasks import compute_statistics

        transaction.on_commit(lambda: compute_statistics.delay(dataset.pk))
    elif not dataset.mark_error(report.summary_text(), report=report.to_dict()):
        return _gone(dataset)
    return dataset


def _gone(dataset: Dataset) -> None:
    """Clean up after a dataset deleted while it was validated: its normalized copy has no row to find it by."""
    log.info("dataset %s was deleted while it was validated", dataset.public_id)
    if dataset.normalized:
        dataset.normalized.delete(save=False)


@transaction.atomic
def dataset_delete(*, dataset: Dataset) -> None:
    """Delete a dataset and its files, unless a queued or running job still needs it."""
    using = FineTuningJob.objects.filter(Q(training_file=dataset) | Q(validation_file=dataset))
    blocking = using.filter(status__in=FineTuningJob.ACTIVE_STATUSES + (FineTuningJob.PAUSED,)).first()
    if blocking is not None:
        raise InvalidState(
            f"File {dataset.public_id} is used by job {blocking.public_id} ({blocking.status}); cancel the job first.",
            code="file_in_use",
        )
    files = [f for f in (dataset.file, dataset.normalized) if f]
    dataset.delete()
    transaction.on_commit(lambda: [f.storage.delete(f.name) for f in files])


NO_TOKENIZER = (
    "No base model is ready, so there is no tokenizer to count tokens with. "
    "`make run` prepares the bundled model; FT_BASE_MODELS registers others."
)


def dataset_compute_statistics(*, dataset_id: int, max_seq_len: int = 1024) -> Dataset | None:
    """Count tokens with the base tokenizer and the chat template, once, and store them.

    Whatever happens, something is stored under report["tokens"], an {"error": ...}
    when counting is impossible or fails, so the page stops waiting for it.
    """
    dataset = Dataset.objects.filter(pk=dataset_id, status=Dataset.PROCESSED).first()
    if dataset is None or not dataset.normalized:
        return dataset
    try:
        tokens = _count_tokens(dataset, max_seq_len=max_seq_len)
    except Exception as exc:  # a failure must show on the page, not leave it polling
        log.exception("token statistics of %s failed", dataset.public_id)
        tokens = {"error": f"Counting tokens failed: {type(exc).__name__}: {exc}"}
    report = dict(dataset.report or {})
    report["tokens"] = tokens
    Dataset.objects.filter(pk=dataset.pk).update(report=report)
    dataset.report = report
    return dataset


def _count_tokens(dataset: Dataset, *, max_seq_len: int) -> dict:
    folder = tokenizer_path()
    if folder is None:
        return {"error": NO_TOKENIZER}
    tokenizer = load_tokenizer(str(folder))
    # The uploaded file, not the normalized copy: its line numbers are the ones the user
    # sees in the file (the copy has no blank lines), and every format normalizes the same.
    with dataset.file.open("rb") as lines:
        stats = token_statistics(lines, tokenizer, max_seq_len=max_seq_len)
    stats["cost_per_epoch"] = estimate_cost(stats["billable_tokens"], 1, settings.FT_PRICE_PER_1K_TOKENS)
    stats["price_per_1k_tokens"] = settings.FT_PRICE_PER_1K_TOKENS
    return stats


def _derived(owner, source: Dataset, suffix: str, path: str, size: int, *, validate: bool = True) -> Dataset:
    stem = source.filename.rsplit(".", 1)[0]
    derived = Dataset(owner=owner, filename=f"{stem}.{suffix}.jsonl"[:255], purpose=source.purpose, bytes=size)
    with open(path, "rb") as fp:
        derived.file.save(f"{derived.public_id}.jsonl", File(fp), save=False)
    derived.save()
    if validate:
        from .tasks import validate_dataset

        transaction.on_commit(lambda: validate_dataset.delay(derived.pk))
    return derived


def _require_processed(dataset: Dataset) -> None:
    if dataset.status != Dataset.PROCESSED or not dataset.normalized:
        raise InvalidState(f"File {dataset.public_id} is not processed yet ({dataset.status}).", code="file_not_ready")


@transaction.atomic
def dataset_split(
    *, dataset: Dataset, validation_percent: float, test_percent: float = 0.0, seed: int = 42, validate: bool = True
) -> list[Dataset]:
    """Split into train/validation(/test) by percentage and seed; the original stays."""
    _require_processed(dataset)
    if not 0 < validation_percent < 100 or not 0 <= test_percent < 100 or validation_percent + test_percent >= 100:
        raise InvalidInput(
            "Percentages must be above 0, and validation + test must stay below 100.", param="validation_percent"
        )
    total = dataset.examples or 0
    n_valid = max(1, round(total * validation_percent / 100))
    n_test = round(total * test_percent / 100) if test_percent else 0
    if total - n_valid - n_test < 1:
        raise InvalidInput(f"{total} examples are too few to split this way.", param="validation_percent")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    part = bytearray(total)  # 0 train, 1 validation, 2 test
    for i in order[:n_valid]:
        part[i] = 1
    for i in order[n_valid : n_valid + n_test]:
        part[i] = 2
    names = ["train", "validation", "test"][: 3 if n_test else 2]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in names]
        outputs = [open(p, "wb") for p in paths]
        try:
            with dataset.normalized.open("rb") as lines:
                for index, line in enumerate(filter(bytes.strip, lines)):
                    outputs[part[index]].write(line if line.endswith(b"\n") else line + b"\n")
        finally:
            for out in outputs:
                out.close()
        return [
            _derived(dataset.owner, dataset, name, p, os.path.getsize(p), validate=validate)
            for name, p in zip(names, paths, strict=True)
        ]


@transaction.atomic
def dataset_dedupe(*, dataset: Dataset) -> Dataset:
    """A copy without exact duplicate examples; the original stays."""
    _require_processed(dataset)
    seen: set[bytes] = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dedup")
        with open(path, "wb") as out, dataset.normalized.open("rb") as lines:
            for line in filter(bytes.strip, lines):
                digest = hashlib.blake2b(line.strip(), digest_size=8).digest()
                if digest not in seen:
                    seen.add(digest)
                    out.write(line if line.endswith(b"\n") else line + b"\n")
        return _derived(dataset.owner, dataset, "dedup", path, os.path.getsize(path))
