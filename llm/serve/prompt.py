"""The prompt a served model is fed: the one chat format's, with its refusals as serving errors."""

from collections.abc import Mapping, Sequence
from typing import Any

from llm.chat import ChatFormatError, NoChatTemplate, chat_format
from llm.chat.format import Tokenizer

from .errors import InvalidRequest, ServingError


def render_prompt(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[int]:
    """Return the prompt token ids for messages (already checked), ending where the assistant answers."""
    try:
        return chat_format(tokenizer).prompt_ids(messages, tools)
    except NoChatTemplate as error:
        raise ServingError(f"the model cannot chat: {error}") from error
    except ChatFormatError as error:  # a conversation the template refuses, e.g. roles out of order
        raise InvalidRequest([str(error)]) from error
