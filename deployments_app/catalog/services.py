"""Writes for model cards: record a job's model, delete a model, build its merged and GGUF downloads."""

import os
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from finetune_site import quotas
from finetune_site.errors import ApplicationError, InvalidInput, InvalidState, NotAllowed, NotFound
from finetune_site.services import notify
from finetune_site.store import discard
from jobs_app.models import FineTuningJob

from ..deployments.services import cancel_deployments_of
from ..models import ModelCard
from .exports import build_marker, build_merged_model, export_dir, merged_state, write_progress
from .gguf_exports import build_gguf, gguf_kind, gguf_state
from .resolution import get_base_model

_SUMMARY_METRICS = (
    "final_train_loss",
    "eval_loss",
    "eval_token_accuracy",
    "train_tokens",
    "tokens_per_second",
    "train_seconds",
)
_DPO_SUMMARY_METRICS = ("final_reward_accuracy", "final_reward_margin", "eval_reward_accuracy", "eval_reward_margin")
"""What a DPO run's summary adds: reward accuracy and margin on the last training steps and on validation."""


def model_card_create_from_job(*, job: FineTuningJob, summary: dict) -> ModelCard:
    """Record the model a succeeded job produced (idempotent for re-runs)."""
    folder = job.model_dir
    kept = _SUMMARY_METRICS + (_DPO_SUMMARY_METRICS if job.objective == FineTuningJob.DPO else ())
    metrics = {k: summary.get(k) for k in kept}
    card, _ = ModelCard.objects.update_or_create(
        model_id=job.fine_tuned_model_id,
        defaults={
            "owner": job.owner,
            "job": job,
            "base_model": job.base_model,
            "method": job.method,
            "objective": job.objective,
            "path": str(folder),
            "hyperparameters": job.resolved,
            "metrics": metrics,
            "size_bytes": quotas.folder_bytes(folder),
        },
    )
    return card


def model_card_of(user, model_id: str) -> ModelCard:
    """The user's fine-tuned model with this id; NotFound when there is none (or it is someone else's)."""
    card = ModelCard.objects.owned_by(user).filter(model_id=model_id).select_related("owner", "job").first()
    if card is None:
        raise NotFound(f"The model {model_id!r} does not exist or you do not have access to it.")
    return card


def model_delete(*, user, model_id: str) -> None:
    """Delete one of the user's fine-tuned models; base models are shared by everyone and stay."""
    if get_base_model(model_id) is not None:
        raise NotAllowed(f"{model_id} is a base model and cannot be deleted.", param="model")
    model_card_delete(card=model_card_of(user, model_id))


@transaction.atomic
def model_card_delete(*, card: ModelCard) -> None:
    """Delete a fine-tuned model, its checkpoints and their files; every one of their ids answers 404 afterwards.

    The job stays (its history and curves are still worth reading), but its
    checkpoint rows go: they are what `...:ckpt-step-N` ids resolve through, and
    a deleted model must not stay usable, deployable or on disk as a checkpoint.
    """
    model_id = card.model_id
    starting = (
        FineTuningJob.objects.filter(Q(init_model=model_id) | Q(init_model__startswith=f"{model_id}:ckpt-step-"))
        .exclude(status__in=FineTuningJob.FINAL_STATUSES)
        .first()
    )
    if starting is not None:
        raise InvalidState(
            f"Job {starting.public_id} ({starting.status}) trains on from {starting.init_model}; "
            "cancel it or let it finish before deleting this model.",
            param="model",
        )
    folders = [Path(card.path), export_dir(card)]
    if card.job is not None:
        # The engine writes every checkpoint under here (llm/train/checkpoint.py).
        folders.append(card.job.output_dir / "checkpoints")
        card.job.checkpoints.all().delete()
    elif Path(card.path).parent.parent == settings.FT_ARTIFACTS_DIR / "jobs":
        # The job was deleted before its model: nothing else uses the run's folder now.
        folders.append(Path(card.path).parent)
    cancel_deployments_of(card.owner, model_id)
    card.delete()
    transaction.on_commit(lambda: discard(*folders))


def _check_merge_room(card: ModelCard) -> None:
    """Refuse a merged build that would take the owner past their storage quota.

    The merged model is the base model with the adapter folded in: about the base's size.
    """
    base = get_base_model(card.base_model)
    quotas.check_room(card.owner_id, quotas.folder_bytes(base.path) if base else 0, param="model")


def model_merge(*, card_id: int) -> None:
    """Build the merged full model of a LoRA card for download (runs on a worker)."""
    card = ModelCard.objects.filter(pk=card_id).first()
    if card is None:
        return
    try:
        _check_merge_room(card)  # again: the quota may have filled since the request was queued
    except ApplicationError as refusal:
        _not_built(card, "merged", f"The merged model of {card.model_id} was not built. {refusal.message}")
        return
    build_merged_model(card, export_dir(card))


def _queue_build(card: ModelCard, kind: str, task) -> None:
    """Mark a build of this kind ("merged", "gguf-f16") as waiting (an abandoned mark is made fresh) and queue it."""
    marker = build_marker(export_dir(card), kind)
    marker.mkdir(parents=True, exist_ok=True)
    os.utime(marker)
    write_progress(export_dir(card), kind, "waiting for a worker")
    transaction.on_commit(task)


def _not_built(card: ModelCard, kind: str, message: str) -> None:
    """A build ended without its export: it is no longer building (it may be asked for again), and the owner hears why."""
    shutil.rmtree(build_marker(export_dir(card), kind), ignore_errors=True)
    notify(card.owner, message, level="error", link="/models/")


def model_merge_request(*, card: ModelCard) -> str:
    """Queue building the merged model unless it is ready or being built; return its state."""
    from .. import tasks  # the tasks module imports these services

    if not card.is_adapter:
        raise InvalidInput("Only LoRA models have a merged download; this model's files are already a full model.")
    state = merged_state(export_dir(card))
    if state == "absent":
        _check_merge_room(card)
        _queue_build(card, "merged", lambda: tasks.build_merged_model.delay(card.pk))
        state = "building"
    return state


def _check_gguf_room(card: ModelCard, quant: str) -> None:
    """Refuse a GGUF build that would take the owner past their quota: the merged model first (unless built),
    then the file, about half the float32 base for f16 and a quarter for q8_0."""
    base = get_base_model(card.base_model)
    base_bytes = quotas.folder_bytes(base.path) if base else 0
    merging = 0 if merged_state(export_dir(card)) == "ready" else base_bytes
    quotas.check_room(card.owner_id, merging + base_bytes // (2 if quant == "f16" else 4), param="model")


def gguf_export_request(*, card: ModelCard, quant: str) -> str:
    """Queue building and checking a GGUF export (f16 or q8_0) unless it is ready or being built; return its state."""
    from llm.export import QUANTS

    from .. import tasks  # the tasks module imports these services

    if quant not in QUANTS:
        raise InvalidInput(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}.", param="quant")
    if not card.is_adapter:
        raise InvalidInput("GGUF exports are built from a LoRA model merged into its base; this is a full model.")
    state = gguf_state(export_dir(card), quant)
    if state == "absent" and merged_state(export_dir(card)) == "building":
        # The GGUF is written from the merged model: a second merge beside it would race the first.
        raise InvalidState(
            "The merged model of this card is being built; build the GGUF once it is ready.", code="merge_in_progress"
        )
    if state == "absent":
        _check_gguf_room(card, quant)
        _queue_build(card, gguf_kind(quant), lambda: tasks.build_gguf_export.delay(card.pk, quant))
        state = "building"
    return state


def gguf_export(*, card_id: int, quant: str) -> None:
    """Build, check and publish a card's GGUF export (runs on a worker); the owner hears of a refusal or failure."""
    from llm.export import GGUFExportError

    card = ModelCard.objects.filter(pk=card_id).first()
    if card is None:
        return
    try:
        _check_gguf_room(card, quant)  # again: the quota may have filled since the request was queued
        build_gguf(card, export_dir(card), quant)
    except (ApplicationError, GGUFExportError) as refusal:
        message = getattr(refusal, "message", refusal)
        _not_built(card, gguf_kind(quant), f"The {quant} GGUF of {card.model_id} was not built. {message}")
    except Exception as failure:  # any other failure (memory, reading the GGUF back): the owner hears of it too
        message = f"The {quant} GGUF of {card.model_id} failed: {type(failure).__name__}: {failure}"
        _not_built(card, gguf_kind(quant), message)
        raise
