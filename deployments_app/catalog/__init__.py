"""The model catalog: which models exist (base and fine-tuned), their Model Square, downloads and deletion.

What other apps need of it (the base models, a model id's files, a tokenizer
to count with) is offered here; the rest lives in the modules beside it.
"""

from .resolution import (
    BaseModel,
    ResolvedModel,
    TrainedModel,
    base_models,
    get_base_model,
    resolve_model,
    tokenizer_path,
    trained_model,
    weights_folder,
)

__all__ = [
    "BaseModel",
    "ResolvedModel",
    "TrainedModel",
    "base_models",
    "get_base_model",
    "resolve_model",
    "tokenizer_path",
    "trained_model",
    "weights_folder",
]
