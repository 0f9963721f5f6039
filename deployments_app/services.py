"""Writes for model cards (and, later, deployments)."""

import shutil
from pathlib import Path

from django.db import transaction

from jobs_app.models import FineTuningJob

from .models import ModelCard


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def model_card_create_from_job(*, job: FineTuningJob, summary: dict) -> ModelCard:
    """Record the model a succeeded job produced (idempotent for re-runs)."""
    folder = job.output_dir / ("model" if job.method == "full" else "adapter")
    metrics = {k: summary.get(k) for k in ("final_train_loss", "eval_loss", "eval_token_accuracy", "train_tokens", "tokens_per_second", "train_seconds")}
    card, _ = ModelCard.objects.update_or_create(
        model_id=job.fine_tuned_model_id,
        defaults={
            "owner": job.owner,
            "job": job,
            "base_model": job.base_model,
            "method": job.method,
            "path": str(folder),
            "hyperparameters": job.resolved,
            "metrics": metrics,
            "size_bytes": _folder_size(folder),
        },
    )
    return card


@transaction.atomic
def model_card_delete(*, card: ModelCard) -> None:
    """Delete a fine-tuned model and its files; its id answers 404 afterwards."""
    folder = Path(card.path)
    card.delete()
    transaction.on_commit(lambda: shutil.rmtree(folder, ignore_errors=True))
