"""The parts of Hugging Face models and tokenizers the training engine uses.

transformers and peft are untyped here (their values are Any), so these
Protocols say what the engine relies on; a transformers causal LM, and a peft
model wrapping one, have them all.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from llm.chat.format import Tokenizer


class TrainTokenizer(Tokenizer, Protocol):
    """A tokenizer as training uses it: the chat format's, and saved beside a fully fine-tuned model."""

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any: ...

    def disable_adapter(self) -> AbstractContextManager[Any]: ...  # peft models only: the base, adapters off


class ModelShape(Protocol):
    """The fields of a transformers model config that memory planning reads."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int


class TrainableModel(Protocol):
    """A causal LM (or a peft model wrapping one) as the training loop runs, measures and saves it."""

    @property
    def config(self) -> Any: ...  # a transformers PretrainedConfig

    training: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def to(self, device: torch.device) -> Any: ...

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None: ...

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any: ...

    def disable_adapter(self) -> AbstractContextManager[Any]: ...  # peft models only: the base, adapters off
