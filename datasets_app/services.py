"""Writes for datasets: store an upload, validate it in the background, delete."""

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from datetime import timedelta

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from deployments_app.catalog import tokenizer_path
from finetune_site import quotas
from finetune_site.broker import waiting_task_args
from finetune_site.errors import InvalidInput, InvalidState, TooLarge
from finetune_site.units import human_bytes
from jobs_app.models import FineTuningJob

from .models import Dataset
from .preview import load_tokenizer
from .token_stats import estimate_cost, token_statistics
from .validation import validate_stream

log = logging.getLogger(__name__)


def dataset_create(*, owner, upload, purpose: str = "fine-tune", filename: str | None = None) -> Dataset:
    """Store an uploaded file and queue its validation.

    The copy (up to FT_MAX_UPLOAD_BYTES) runs before the row is written, outside any
    transaction: SQLite holds its one write lock for a whole transaction, and every
    other writer would wait for the copy. A row that cannot be written takes its file with it.
    """
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
    quotas.check_room(owner, upload.size)
    name = os.path.basename(filename or upload.name or "upload") or "upload"
    dataset = Dataset(owner=owner, filename=name[:255], purpose=purpose, bytes=upload.size)
    # Django streams the upload to storage in chunks (or moves its temporary file), never the whole file in memory.
    _store(dataset.file, f"{dataset.public_id}.jsonl", upload)
    dataset.enqueued_at = timezone.now()
    try:
        dataset.save()
    except BaseException:
        dataset.file.delete(save=False)
        raise
    from .tasks import validate_dataset

    _enqueue(validate_dataset, dataset.pk)
    return dataset


def _enqueue(task, argument) -> None:
    """Queue a task once the rows it reads are committed.

    A broker that is down must not undo or fail a request whose rows are saved: the
    periodic reconciliation (datasets_reconcile) queues the work again later.
    """

    def send() -> None:
        try:
            task.delay(argument)
        except Exception:
            log.warning("could not queue %s(%s); the reconciliation retries it", task.name, argument, exc_info=True)

    transaction.on_commit(send)


def dataset_validate(*, dataset_id: int) -> Dataset | None:
    """Validate a stored file line by line; write its normalized chat lines beside it.

    Returns None, quietly, when the dataset is deleted before or while it is validated.
    """
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None or dataset.status != Dataset.UPLOADED or dataset.is_being_written:
        return dataset  # done already, or still being written by dataset_derive (which validates it next)
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
        _tell_waiting_jobs(dataset.pk)
        return dataset
    if report.ok:
        details = report.summary_text() if report.warnings else ""
        if not dataset.mark_processed(
            examples=report.examples, fmt=report.format, report=report.to_dict(), details=details
        ):
            return _gone(dataset)
        from .tasks import compute_statistics

        _enqueue(compute_statistics, dataset.pk)
    elif not dataset.mark_error(report.summary_text(), report=report.to_dict()):
        return _gone(dataset)
    _tell_waiting_jobs(dataset.pk)
    return dataset


def _tell_waiting_jobs(dataset_id: int) -> None:
    """Jobs created while the file was validated start, or fail with its errors, once its result is committed."""
    from jobs_app.services import jobs_advance_waiting_on  # jobs_app.services imports this module

    transaction.on_commit(lambda: jobs_advance_waiting_on(dataset_id=dataset_id))


def _gone(dataset: Dataset) -> None:
    """Clean up after a dataset deleted (or validated by a second run) meanwhile: this normalized copy has no row."""
    log.info("dataset %s was deleted or validated elsewhere while it was validated", dataset.public_id)
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
    report.pop("tokens_progress", None)
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
        stats = token_statistics(lines, tokenizer, max_seq_len=max_seq_len, progress=_progress_writer(dataset))
    stats["cost_per_epoch"] = estimate_cost(stats["billable_tokens"], 1, settings.FT_PRICE_PER_1K_TOKENS)
    stats["price_per_1k_tokens"] = settings.FT_PRICE_PER_1K_TOKENS
    return stats


TOKENS_PROGRESS_SECONDS = 1.0
"""How often counting tokens writes how far it got, for the page's progress line."""


def _progress_writer(dataset: Dataset):
    """A progress callback for token_statistics that stores {"counted", "of"} in the report at most once a second.

    The report written is the one read before counting began: nothing else writes a processed
    file's report meanwhile, and the final write (with the statistics) drops the progress again.
    """
    last = time.monotonic()

    def write(counted: int) -> None:
        nonlocal last
        if time.monotonic() - last < TOKENS_PROGRESS_SECONDS:
            return
        last = time.monotonic()
        total = dataset.examples or 0
        progress = {"counted": min(counted, total) if total else counted, "of": total}  # `counted` includes bad lines
        Dataset.objects.filter(pk=dataset.pk).update(report={**(dataset.report or {}), "tokens_progress": progress})

    return write


def _require_processed(dataset: Dataset) -> None:
    if dataset.status != Dataset.PROCESSED or not dataset.normalized:
        raise InvalidState(f"File {dataset.public_id} is not processed yet ({dataset.status}).", code="file_not_ready")


SPLIT_PARTS = ("train", "validation", "test")


def split_options(data) -> dict:
    """The split settings of a form or API body, with the defaults the page shows."""
    if not hasattr(data, "get"):
        raise InvalidInput("The split settings must be an object: validation_percent, test_percent, seed.")
    try:
        return {
            "validation_percent": float(data.get("validation_percent") or 10),
            "test_percent": float(data.get("test_percent") or 0),
            "seed": int(data.get("seed") or 42),
        }
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"Invalid split settings: {exc}", param="validation_percent") from None


def dataset_split(
    *, dataset: Dataset, validation_percent: float, test_percent: float = 0.0, seed: int = 42, validate: bool = True
) -> list[Dataset]:
    """Split into train/validation(/test) by percentage and seed; the original stays.

    The parts come back at once, uploaded and empty, and a worker writes and validates
    them (dataset_derive). validate=False writes them here instead and leaves their
    validation to the caller: for a caller that is a worker itself (a job's holdout).
    """
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
    # The parts together are as large as the source.
    quotas.check_room(dataset.owner, dataset.bytes, param=None)
    recipe = {"op": "split", "source": dataset.pk, "validation_percent": validation_percent}
    recipe |= {"test_percent": test_percent, "seed": seed}
    origins = [{**recipe, "part": index} for index in range(3 if n_test else 2)]
    if validate:
        return _derive_later(dataset, origins)
    return _derive_now(dataset, origins)


def dataset_dedupe(*, dataset: Dataset) -> Dataset:
    """A copy without exact duplicate examples, written and validated by a worker; the original stays."""
    _require_processed(dataset)
    # At most as large as the source.
    quotas.check_room(dataset.owner, dataset.bytes, param=None)
    return _derive_later(dataset, [{"op": "dedupe", "source": dataset.pk}])[0]


def _derived_name(source: Dataset, origin: dict) -> str:
    suffix = SPLIT_PARTS[origin["part"]] if origin["op"] == "split" else "dedup"
    return f"{source.filename.rsplit('.', 1)[0]}.{suffix}.jsonl"[:255]


def _expected_bytes(source: Dataset, origin: dict) -> int:
    """About how large a derived file will be: its share of the source (all of it for a dedupe)."""
    if origin["op"] != "split":
        return source.bytes
    held_out = [origin["validation_percent"], origin["test_percent"]]
    share = 100 - sum(held_out) if origin["part"] == 0 else held_out[origin["part"] - 1]
    return round(source.bytes * share / 100)


def _derive_later(source: Dataset, origins: list[dict]) -> list[Dataset]:
    """The rows now, uploaded and without a file; their lines are written by the derive_datasets task."""
    with transaction.atomic():
        rows = [
            Dataset.objects.create(
                owner=source.owner,
                filename=_derived_name(source, origin),
                purpose=source.purpose,
                origin=origin,
                bytes=_expected_bytes(source, origin),  # counts against the quota until the file is written
                status_details=f"Being written from {source.public_id} in the background, then validated.",
            )
            for origin in origins
        ]
        from .tasks import derive_datasets

        _enqueue(derive_datasets, [row.pk for row in rows])
    return rows


def _derive_now(source: Dataset, origins: list[dict]) -> list[Dataset]:
    """Write the files first, outside any transaction, then create their rows in one short one."""
    rows = [
        Dataset(owner=source.owner, filename=_derived_name(source, origin), purpose=source.purpose, origin=origin)
        for origin in origins
    ]
    _write_derived(source, rows)
    try:
        with transaction.atomic():
            for row in rows:
                row.save()
    except BaseException:
        for row in rows:
            row.file.delete(save=False)
        raise
    return rows


def dataset_derive(*, dataset_ids: list[int], validate: bool = True) -> list[Dataset]:
    """Write split or deduplicated files that are still empty, then validate them; a second run does nothing.

    A failure ends each unwritten row in the error state with the reason, and leaves no file behind.
    """
    rows = list(Dataset.objects.filter(pk__in=dataset_ids, status=Dataset.UPLOADED, file="", origin__isnull=False))
    written = []
    # One pass over a source for all the parts of one split; a dedupe or another split of it is another group.
    groups: dict[str, list[Dataset]] = {}
    for row in rows:
        recipe = {key: value for key, value in row.origin.items() if key != "part"}
        groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(row)
    for group in groups.values():
        source = Dataset.objects.filter(pk=group[0].origin["source"]).first()
        if source is None or source.status != Dataset.PROCESSED or not source.normalized:
            for row in group:
                row.mark_error(f"The source file was deleted or changed before {row.filename} was written.")
            continue
        try:
            _write_derived(source, group)
        except Exception as exc:
            log.exception("writing %s from %s failed", [row.public_id for row in group], source.public_id)
            for row in group:
                row.mark_error(f"Writing this file from {source.public_id} failed: {type(exc).__name__}: {exc}")
            continue
        for row in group:
            # Only the first run stores its file: a second one (re-queued) or a row deleted meanwhile loses its copy.
            claimed = Dataset.objects.filter(pk=row.pk, status=Dataset.UPLOADED, file="")
            if claimed.update(file=row.file.name, bytes=row.bytes, status_details="") == 1:
                written.append(row)
            else:
                row.file.delete(save=False)
    if validate:
        for row in written:
            dataset_validate(dataset_id=row.pk)
    return list(Dataset.objects.filter(pk__in=[row.pk for row in written]).order_by("pk"))


def datasets_reconcile(*, stuck_after: timedelta | None = None, batch: int = 100) -> list[str]:
    """Queue again the work a lost task left undone (a Redis restart, a killed worker); the ids queued.

    Datasets still being written or validated, and token statistics never stored,
    once their last task was queued longer than stuck_after ago and its message no longer
    waits in the broker. By default that is longer than a task may run (FT_TASK_TIME_LIMIT),
    so a task is rarely run twice; when it is, the second run finds the work done or records nothing.
    """
    from .tasks import compute_statistics, derive_datasets, validate_dataset

    now = timezone.now()
    cutoff = now - (stuck_after or timedelta(seconds=settings.FT_DATASET_STUCK_SECONDS))
    waiting = Dataset.objects.filter(enqueued_at__lt=cutoff)
    stuck = list(waiting.filter(status=Dataset.UPLOADED).order_by("enqueued_at")[:batch])
    uncounted = list(
        waiting.filter(status=Dataset.PROCESSED, processed_at__lt=cutoff)
        .exclude(normalized="")
        .exclude(report__has_key="tokens")
        .order_by("enqueued_at")[:batch]
    )
    if not stuck and not uncounted:
        return []
    # A message a worker took this long ago and never began is lost with that worker.
    within = (now - cutoff).total_seconds()
    in_broker = {
        args[0]
        for task in (validate_dataset, compute_statistics)
        for args in waiting_task_args(task.name, reserved_within=within)
    }
    in_broker |= {pk for args in waiting_task_args(derive_datasets.name, reserved_within=within) for pk in args[0]}
    queued = []
    for dataset in stuck + uncounted:
        if dataset.pk in in_broker:  # behind a backlog, not lost
            continue
        # Claimed by moving enqueued_at on: two sweeps at once queue each dataset once.
        if not Dataset.objects.filter(pk=dataset.pk, enqueued_at=dataset.enqueued_at).update(enqueued_at=now):
            continue
        if dataset.status == Dataset.PROCESSED:
            _enqueue(compute_statistics, dataset.pk)
        elif dataset.file:
            _enqueue(validate_dataset, dataset.pk)
        elif dataset.origin:
            _enqueue(derive_datasets, [dataset.pk])
        else:
            dataset.mark_error("The file was never stored; upload it again.")
            continue
        queued.append(dataset.public_id)
    if queued:
        log.info("re-queued the lost work of datasets %s", ", ".join(queued))
    return queued


def _store(field_file, filename: str, content) -> None:
    """Save content under the field's folder without saving the row; a write that fails leaves nothing there."""
    storage = field_file.storage
    name = storage.get_available_name(
        field_file.field.generate_filename(field_file.instance, filename), max_length=field_file.field.max_length
    )
    try:
        field_file.name = storage.save(name, content, max_length=field_file.field.max_length)
    except BaseException:
        storage.delete(name)  # the part written before the failure (a full disk); the name was free, so it is ours
        raise


class _ScratchFile(File):
    """A finished temporary file: local storage moves it into place (a rename on one disk) instead of copying it."""

    def temporary_file_path(self) -> str:
        return self.name


def _write_derived(source: Dataset, rows: list[Dataset]) -> None:
    """Write each row's lines (all from one source, in one pass) and store them; on failure, nothing stays stored.

    Sets each row's file and bytes without saving the row.
    """
    scratch = tempfile.mkdtemp(prefix="derive-", dir=settings.FILE_UPLOAD_TEMP_DIR)
    try:
        paths = [os.path.join(scratch, f"{index}.jsonl") for index in range(len(rows))]
        _write_lines(source, [row.origin for row in rows], paths)
        for row, path in zip(rows, paths, strict=True):
            row.bytes = os.path.getsize(path)
            with _ScratchFile(open(path, "rb"), name=path) as scratch_file:
                _store(row.file, f"{row.public_id}.jsonl", scratch_file)
    except BaseException:
        for row in rows:
            if row.file:
                row.file.delete(save=False)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_lines(source: Dataset, origins: list[dict], paths: list[str]) -> None:
    """Copy the source's normalized lines into paths: a split's parts, or the first of each duplicate."""
    outputs = [open(path, "wb") for path in paths]
    try:
        with source.normalized.open("rb") as lines:
            if origins[0]["op"] == "dedupe":
                _write_deduplicated(lines, outputs)
            else:
                _write_split(lines, origins, outputs, total=source.examples or 0)
    finally:
        for out in outputs:
            out.close()


def _write_split(lines, origins: list[dict], outputs: list, *, total: int) -> None:
    recipe = origins[0]
    n_valid = max(1, round(total * recipe["validation_percent"] / 100))
    n_test = round(total * recipe["test_percent"] / 100) if recipe["test_percent"] else 0
    order = list(range(total))
    random.Random(recipe["seed"]).shuffle(order)
    part = bytearray(total)  # 0 train, 1 validation, 2 test
    for i in order[:n_valid]:
        part[i] = 1
    for i in order[n_valid : n_valid + n_test]:
        part[i] = 2
    # Parts not asked for (a re-queued row whose siblings are written) are skipped.
    out_for = {origin["part"]: out for origin, out in zip(origins, outputs, strict=True)}
    for index, line in enumerate(filter(bytes.strip, lines)):
        out = out_for.get(part[index])
        if out is not None:
            out.write(line if line.endswith(b"\n") else line + b"\n")


def _write_deduplicated(lines, outputs: list) -> None:
    seen: set[bytes] = set()
    for line in filter(bytes.strip, lines):
        digest = hashlib.blake2b(line.strip(), digest_size=8).digest()
        if digest not in seen:
            seen.add(digest)
            for out in outputs:
                out.write(line if line.endswith(b"\n") else line + b"\n")
