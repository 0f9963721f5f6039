"""The parts of Hugging Face models and tokenizers the serving engine uses.

transformers and peft are untyped here (their values are Any), so these
Protocols say what the engine relies on; any transformers causal LM and
tokenizer have them.
"""

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from llm.chat.format import Tokenizer


class TokenDecoder(Protocol):
    """A tokenizer as incremental decoding uses it."""

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str: ...


class ServingTokenizer(Tokenizer, TokenDecoder, Protocol):
    """A tokenizer as serving uses it: the chat format's, decoding, and its end-of-text token."""

    eos_token_id: int | None


class CausalLM(Protocol):
    """A causal language model as the token loop runs it."""

    @property
    def device(self) -> torch.device: ...

    @property
    def config(self) -> Any: ...  # a transformers PretrainedConfig

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class ServedModel(CausalLM, Protocol):
    """A causal language model as the pool loads and keeps it."""

    @property
    def generation_config(self) -> Any: ...  # a transformers GenerationConfig

    def eval(self) -> Any: ...

    def to(self, device: torch.device) -> Any: ...


class AdapterModel(ServedModel, Protocol):
    """A peft PeftModel: the served model once a LoRA adapter is loaded into it."""

    @property
    def base_model(self) -> Any: ...  # the peft tuner: enable_adapter_layers(), disable_adapter_layers()

    @property
    def active_adapter(self) -> str: ...

    def load_adapter(self, model_id: str, adapter_name: str, **kwargs: Any) -> Any: ...

    def set_adapter(self, adapter_name: str, *, inference_mode: bool = False) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...
