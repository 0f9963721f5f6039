"""Per-user quotas on what an account keeps: bytes of storage and serving instances.

Storage counts what one account's data takes on disk: its uploaded dataset files
(the size recorded at upload, plus the normalized copy validation writes beside
each), every one of its jobs' folders (checkpoints, the adapter or model, logs),
the folder a model keeps after its job was deleted, and its merged-model builds.
Nothing another account owns is ever counted. Usage is measured when asked: one
stat per dataset and a walk of the account's own folders, which hold a few files
per job (retention keeps FT_KEEP_CHECKPOINTS checkpoints each), so a check costs
in proportion to that account's own data and nobody else's.

It is checked before anything adds to it: an upload (`check_room`), a new job
(`check_not_full`), each checkpoint of a running job (`checkpoint_refusal`, which
the engine asks through `llm.train.checkpoint.limit_room`; a refusal ends the run
as a full disk does, earlier checkpoints kept) and a merged-model build.

Deployment slots count the instances an account's active deployments ask for,
whatever their state: creating or scaling past FT_MAX_DEPLOYMENT_SLOTS_PER_USER
is refused with 429, as too many active jobs are (finetune_site.limits has the
per-minute limits).

    FT_STORAGE_QUOTA_BYTES             bytes one account's data may take on disk (0: no limit)
    FT_MAX_DEPLOYMENT_SLOTS_PER_USER   instances one account's deployments may hold in all (0: no limit)
"""

import logging
import os
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Sum

from datasets_app.models import Dataset
from deployments_app.catalog.exports import export_dir
from deployments_app.models import Deployment, ModelCard
from jobs_app.models import FineTuningJob

from .errors import Busy, CapacityExceeded
from .store import store
from .units import human_bytes

STORAGE_QUOTA_CODE = "storage_quota_exceeded"
DEPLOYMENT_SLOTS_CODE = "too_many_deployment_instances"
_FREE_UP = "Delete files, jobs or models you no longer need to make room."

log = logging.getLogger(__name__)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under folder (0 when it is gone); with a bucket (FT_STORE), of its copy there."""
    stored = store().bytes_under(folder)
    if stored is not None:
        return stored
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while counted (a pruned checkpoint)
                pass
    return total


def _file_bytes(field) -> int:
    if not field:
        return 0
    try:
        return field.size
    except OSError:  # gone meanwhile
        return 0


def storage_used(owner) -> int:
    """Bytes the owner's (a user or a user id) datasets, jobs, models and merged builds take on disk."""
    used = 0
    for dataset in Dataset.objects.filter(owner=owner).only("bytes", "normalized"):
        used += dataset.bytes + _file_bytes(dataset.normalized)
    for job in FineTuningJob.objects.filter(owner=owner).only("public_id"):
        used += folder_bytes(job.output_dir)
    jobs_dir = settings.FT_ARTIFACTS_DIR / "jobs"
    for card in ModelCard.objects.filter(owner=owner).only("pk", "path", "job_id", "size_bytes"):
        if card.job_id is None:  # its job was deleted: what stays of the run's folder is the model's
            folder = Path(card.path).parent
            used += folder_bytes(folder) if folder.parent == jobs_dir else card.size_bytes
        used += folder_bytes(export_dir(card))
    return used


def _quota_words(used: int, quota: int) -> str:
    return f"your data takes {human_bytes(used)} of your {human_bytes(quota)} storage quota (FT_STORAGE_QUOTA_BYTES)"


def check_room(owner, adding_bytes: int, *, param: str | None = "file") -> None:
    """Refuse (CapacityExceeded, storage_quota_exceeded) to add adding_bytes past the owner's storage quota."""
    quota = settings.FT_STORAGE_QUOTA_BYTES
    if not quota:
        return
    used = storage_used(owner)
    if used + adding_bytes > quota:
        raise CapacityExceeded(
            f"Storage quota exceeded: {_quota_words(used, quota)}, and this needs {human_bytes(adding_bytes)} more. "
            + _FREE_UP,
            param=param,
            code=STORAGE_QUOTA_CODE,
        )


def check_not_full(owner) -> None:
    """Refuse (CapacityExceeded, storage_quota_exceeded) new work that writes files once the quota is used up."""
    quota = settings.FT_STORAGE_QUOTA_BYTES
    if not quota:
        return
    used = storage_used(owner)
    if used >= quota:
        raise CapacityExceeded(
            f"Storage quota exceeded: {_quota_words(used, quota)}, so a new job would have no room for its "
            f"checkpoints. {_FREE_UP}",
            code=STORAGE_QUOTA_CODE,
        )


def checkpoint_refusal(owner_id: int, expected_bytes: int) -> str | None:
    """Why a checkpoint of about expected_bytes may not be written for the owner, or None when it fits."""
    quota = settings.FT_STORAGE_QUOTA_BYTES
    if not quota:
        return None
    try:
        used = storage_used(owner_id)
    except DatabaseError:  # a passing hiccup must not end a run: the disk's own check still stands
        log.warning("storage quota of user %s not checked before a checkpoint", owner_id, exc_info=True)
        return None
    if used + expected_bytes <= quota:
        return None
    return (
        f"it needs about {human_bytes(expected_bytes)}, and {_quota_words(used, quota)}, which leaves "
        f"{human_bytes(max(quota - used, 0))}."
    )


def check_deployment_slots(user, adding: int) -> None:
    """Refuse (Busy, 429) adding instances past FT_MAX_DEPLOYMENT_SLOTS_PER_USER across the user's deployments.

    Call it inside the transaction that saves the change, after hold_until_commit("serving-capacity").
    """
    most = settings.FT_MAX_DEPLOYMENT_SLOTS_PER_USER
    if not most or adding <= 0:
        return
    held = Deployment.objects.owned_by(user).active().aggregate(total=Sum("instances"))["total"] or 0
    if held + adding > most:
        raise Busy(
            f"Too many serving instances: your deployments hold {held} of the {most} one account may have "
            f"(FT_MAX_DEPLOYMENT_SLOTS_PER_USER), and this needs {adding} more. Scale down or cancel a deployment "
            "first.",
            retry_after=60,
            param="instances",
            code=DEPLOYMENT_SLOTS_CODE,
        )
