"""The one chat format: conversations -> template text, tokens, loss mask, generation prompt, tool markup.

Training (`llm.train`), serving (`llm.serve`), token statistics, the dataset
preview and the playground all render through this package, so a model is served
the same text it was trained on. Plain Python; it uses a tokenizer it is given.
"""

from .checks import ROLES, check_messages, check_tools
from .format import (
    IGNORE_INDEX,
    ChatFormat,
    ChatFormatError,
    NoChatTemplate,
    RenderedExample,
    chat_format,
    template_shows_tools,
    text_of,
)
from .tools import TOOL_CALL_OPEN, describe_tools, parse_tool_calls, tool_calls_as_text

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "TOOL_CALL_OPEN",
    "ChatFormat",
    "ChatFormatError",
    "NoChatTemplate",
    "RenderedExample",
    "chat_format",
    "check_messages",
    "check_tools",
    "describe_tools",
    "parse_tool_calls",
    "template_shows_tools",
    "text_of",
    "tool_calls_as_text",
]
