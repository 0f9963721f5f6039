"""The base models this installation offers, and resolving any model id to its files."""

import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from finetune_site.store import store
from jobs_app.selectors import checkpoint_for_model_id
from llm.bundled import BUNDLED_HUB_ID, BUNDLED_MODEL_ID, TINY_MODEL_ID, is_ready

from ..models import ModelCard


@dataclass(frozen=True)
class BaseModel:
    id: str
    path: Path
    description: str
    owned_by: str = "system"
    hub_id: str | None = None
    """Its public id on the Hugging Face hub, when it has one: exports name it instead of our folder."""

    @property
    def ready(self) -> bool:
        return is_ready(self.path) or (self.path / "config.json").exists()

    @property
    def public_id(self) -> str:
        """How an export names this base: its hub id, else our id for it (never a path on this server)."""
        return self.hub_id or self.id


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model id's weights are: a base folder and, for adapters, a PEFT folder."""

    id: str
    base_path: Path
    adapter_path: Path | None
    card: object = None

    def fetch(self) -> "ResolvedModel":
        """Bring its files from the store before a model loads them: they may have been trained elsewhere."""
        for path in (self.base_path, self.adapter_path):
            if path is not None:
                store().fetch(path)
        return self


def base_models() -> list[BaseModel]:
    models_dir = settings.FT_MODELS_DIR
    found = [
        BaseModel(
            BUNDLED_MODEL_ID,
            models_dir / BUNDLED_MODEL_ID,
            "SmolLM2 135M Instruct (bundled, real weights)",
            hub_id=BUNDLED_HUB_ID,
        ),
        BaseModel(TINY_MODEL_ID, models_dir / TINY_MODEL_ID, "Tiny randomly initialised model for quick tries"),
    ]
    # FT_BASE_MODELS="name=/path/to/hf-folder,other=/path" registers more.
    for item in filter(None, (part.strip() for part in os.environ.get("FT_BASE_MODELS", "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ImproperlyConfigured(f"FT_BASE_MODELS entries must look like name=/path, got {item!r}")
        found.append(BaseModel(name.strip(), Path(path.strip()), f"Registered from {path.strip()}"))
    return found


def get_base_model(model_id: str) -> BaseModel | None:
    return next((m for m in base_models() if m.id == model_id), None)


@dataclass(frozen=True)
class TrainedModel:
    """A fine-tuned model or one of its checkpoints: what it was trained from, how, and its weights."""

    id: str
    base_model: str
    method: str
    folder: Path
    """The PEFT adapter folder (lora, dora, qlora) or the full model folder (full)."""
    card: object = None

    @property
    def is_adapter(self) -> bool:
        return self.method != "full"


def resolve_model(user, model_id: str) -> ResolvedModel | None:
    """Map a base, fine-tuned or checkpoint model id the user may use to its files."""

    base = get_base_model(model_id)
    if base is not None:
        return ResolvedModel(base.id, base.path, None) if base.ready else None
    trained = trained_model(user, model_id)
    if trained is None:
        return None
    if not trained.is_adapter:
        return ResolvedModel(model_id, trained.folder, None, trained.card)
    base = get_base_model(trained.base_model)
    if base is None:
        return None
    return ResolvedModel(model_id, base.path, trained.folder, trained.card)


def trained_model(user, model_id: str) -> TrainedModel | None:
    """The user's fine-tuned model or checkpoint with this id, or None (base models are not trained ones)."""
    card = ModelCard.objects.owned_by(user).filter(model_id=model_id).first()
    if card is not None:
        return TrainedModel(model_id, card.base_model, card.method, Path(card.path), card)
    checkpoint = checkpoint_for_model_id(user, model_id)
    if checkpoint is not None:
        job = checkpoint.job
        return TrainedModel(model_id, job.base_model, job.method, weights_folder(Path(checkpoint.path)))
    return None


def weights_folder(folder: Path) -> Path:
    """The folder inside a run or checkpoint directory that holds loadable weights."""
    for candidate in (folder, folder / "adapter", folder / "model"):
        if (candidate / "adapter_config.json").exists() or (candidate / "config.json").exists():
            return candidate
    return folder


def tokenizer_path(model_id: str | None = None) -> Path | None:
    """The folder of a ready base model whose tokenizer counts tokens for model_id (or any)."""
    base = get_base_model(model_id) if model_id else None
    if base is not None and base.ready:
        return base.path
    return next((b.path for b in base_models() if b.ready), None)
