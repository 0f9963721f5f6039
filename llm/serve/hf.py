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

    def set_attn_implementation(self, attn_implementation: str) -> None: ...
