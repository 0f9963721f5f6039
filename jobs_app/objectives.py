"""What a job trains toward, and which datasets can train it.

A job's objective is supervised fine-tuning (the replies of chat examples) or DPO
(the preferred answer of preference pairs). The dataset decides: a file of
preference pairs trains DPO, a file of chat examples trains SFT, and a mismatch
is refused when the job is created, never after it was queued.

The job row and the engine say "sft" and "dpo"; OpenAI's `method.type` says
"supervised" and "dpo". `public_name` and `from_public_name` are the one mapping.
"""

from datasets_app.models import Dataset
from finetune_site.errors import InvalidInput
from llm.train.hyperparameters import BY_NAME

from .models import FineTuningJob

SFT = FineTuningJob.SFT
DPO = FineTuningJob.DPO
OBJECTIVES = dict(FineTuningJob.OBJECTIVE_CHOICES)
"""Each objective and how the pages name it."""

_PUBLIC_NAMES = {SFT: "supervised", DPO: "dpo"}

PREFERENCE, CHAT, IMAGE = "preference", "chat", "image"
_KIND_WORDS = {
    PREFERENCE: "preference pairs",
    CHAT: "chat examples",
    IMAGE: "examples with images",
}
_NEEDS = {
    SFT: "a file of chat examples (messages)",
    DPO: "a file of preference pairs (input, preferred_output, non_preferred_output)",
}


def public_name(objective: str) -> str:
    """OpenAI's `method.type` for an objective: supervised or dpo."""
    return _PUBLIC_NAMES[objective]


def from_public_name(method_type: str) -> str | None:
    """The objective a `method.type` names, or None when it names none here."""
    return next((objective for objective, name in _PUBLIC_NAMES.items() if name == method_type), None)


def public_names() -> list[str]:
    return list(_PUBLIC_NAMES.values())


def dataset_kind(dataset: Dataset) -> str:
    """preference, image or chat: what the validator found the file to hold."""
    # Images first: a file of preference pairs with image parts is refused like any image file.
    images = ((dataset.report or {}).get("stats") or {}).get("images") or 0
    if dataset.format == "image" or images:
        return IMAGE
    if dataset.format == "preference":
        return PREFERENCE
    # chat, function_calling and the formats converted to chat (prompt/completion, alpaca, sharegpt).
    return CHAT


def kind_words(dataset: Dataset) -> str:
    """The dataset's kind as the form and the refusals say it: "preference pairs"."""
    return _KIND_WORDS[dataset_kind(dataset)]


def objective_of(dataset: Dataset) -> str | None:
    """The objective a dataset trains; None for one that nothing here can train (images)."""
    kind = dataset_kind(dataset)
    if kind == IMAGE:
        return None
    return DPO if kind == PREFERENCE else SFT


def check_training_file(dataset: Dataset, objective: str | None) -> str:
    """Return the objective the training file trains; refuse a file of another kind than asked for."""
    fits = _trainable(dataset, "training_file")
    if objective is not None and objective != fits:
        raise InvalidInput(
            f"File {dataset.public_id} holds {kind_words(dataset)}, which train with method {public_name(fits)} "
            f"({OBJECTIVES[fits]}); method {public_name(objective)} needs {_NEEDS[objective]}.",
            param="training_file",
            code="invalid_file",
        )
    return fits


def check_validation_file(dataset: Dataset, *, training: Dataset) -> None:
    """Refuse a validation file of another kind than the training file."""
    fits = _trainable(dataset, "validation_file")
    if fits != objective_of(training):
        raise InvalidInput(
            f"Validation file {dataset.public_id} holds {kind_words(dataset)}, but training file "
            f"{training.public_id} holds {kind_words(training)}: both must be of the same kind.",
            param="validation_file",
            code="invalid_file",
        )


def _trainable(dataset: Dataset, param: str) -> str:
    objective = objective_of(dataset)
    if objective is None:
        raise InvalidInput(
            f"File {dataset.public_id} holds {kind_words(dataset)}; vision training is not supported yet. "
            "Use a file of text chat examples or preference pairs.",
            param=param,
            code="invalid_file",
        )
    return objective


def check_hyperparameters_for(requested: dict, objective: str, *, training: Dataset) -> None:
    """Refuse a hyperparameter that means nothing for the objective, such as beta for a supervised job."""
    for name in requested:
        definition = BY_NAME.get(name)
        if definition is not None and objective not in definition.objectives:
            allowed = " or ".join(public_name(o) for o in definition.objectives)
            raise InvalidInput(
                f"{name} applies to method {allowed} only, and this job trains method {public_name(objective)}: "
                f"file {training.public_id} holds {kind_words(training)}.",
                param=f"hyperparameters.{name}",
            )
