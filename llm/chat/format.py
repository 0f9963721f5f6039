"""A conversation -> template text -> token ids, with the loss mask and the generation prompt.

The one place that decides what a model sees. Training renders whole examples
(`ChatFormat.render`), serving renders a prompt that ends where the assistant
answers (`ChatFormat.prompt_ids`), token statistics and the dataset preview count
and show what training renders. Because all of them go through the same
`template_messages`, a model is served exactly the text it was trained on.

What a conversation becomes before the tokenizer's chat template sees it:

- content is the text of the message (a list of text parts is joined; image
  parts are refused: the engines are text-only, statistics count images apart);
- the `developer` role is written as `system` (chat templates know no `developer`);
- a template that shows tools gets them, and tool call arguments as a mapping;
- a template that ignores tools gets their description in the system message,
  and every earlier tool call as `<tool_call>` text in its assistant turn, with or
  without `tools` in the conversation, so the calls never silently vanish.

Which tokens are trained is decided in character space: each assistant reply is
located by rendering the conversation up to it (with the generation prompt, so
its header is excluded) and through it (so its end-of-turn marker is included),
and tokens whose characters overlap a reply are trained. This needs no
knowledge of any particular template, only that rendering a prefix of the
conversation renders a prefix of the text; where a template rewrites earlier
turns, the common prefix is used instead.

Rendering two prefixes per reply is quadratic in the turns, so a conversation
with more than a few replies is rendered once more with each message's content
marked, and each prefix's end is read off that text with the turn headers the
template was seen to write (`_Layout`). Where that reading is not possible, or
disagrees with the two prefix renders at the first or the last reply, every
reply is located by its prefix renders.
"""

from __future__ import annotations

import itertools
import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from os.path import commonprefix
from typing import Any, Literal, Protocol

from .tools import describe_tools, tool_calls_as_text

IGNORE_INDEX = -100
"""Label of a token the loss skips (the convention of torch's cross_entropy and transformers)."""

Message = dict[str, Any]
LossOn = Literal["assistant", "all"]

_TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
# Private-use characters around each message's content in the marked render: no text uses them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PREFIX_RENDERED_REPLIES = 2
"""A conversation with at most this many trained replies has them located by prefix renders only."""
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe_tool_7f3a", "description": "probe", "parameters": {"type": "object"}},
}


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the chat format uses."""

    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def __hash__(self) -> int: ...  # chat_format caches per tokenizer


class ChatFormatError(ValueError):
    """A conversation this model's chat template cannot render (roles out of order, image parts...)."""


class NoChatTemplate(ChatFormatError):
    """The tokenizer has no chat template: the model cannot chat."""


@dataclass(frozen=True)
class RenderedExample:
    """One conversation as training sees it."""

    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids: the token id where it is trained, IGNORE_INDEX elsewhere (not shifted)."""
    truncated_tokens: int = 0
    """Tokens cut off the end to fit max_seq_len."""

    @property
    def loss_mask(self) -> list[int]:
        """1 where the token is trained, 0 elsewhere."""
        return [int(label != IGNORE_INDEX) for label in self.labels]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class ChatFormat:
    """How one tokenizer's chat template turns conversations into text and tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.shows_tools = template_shows_tools(tokenizer)

    def template_messages(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> tuple[list[Message], list[Mapping[str, Any]] | None]:
        """Return the messages and tools exactly as the chat template is given them."""
        plain = [_plain_message(message, parse_arguments=self.shows_tools) for message in messages]
        if self.shows_tools:
            return plain, list(tools) if tools else None
        plain = [_calls_in_text(message) for message in plain]
        if tools:
            plain = _tools_in_system_message(plain, tools)
        return plain, None

    def text(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        generation_prompt: bool,
    ) -> str:
        """The template text of a conversation; with generation_prompt it ends where the assistant answers."""
        rendered, template_tools = self.template_messages(messages, tools)
        return self._apply(rendered, template_tools, generation_prompt=generation_prompt)

    def prompt_ids(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The token ids a model is fed to answer this conversation next."""
        return self._encode(self.text(messages, tools, generation_prompt=True))

    def render(
        self, example: Mapping[str, Any], *, loss_on: LossOn = "assistant", max_seq_len: int | None = None
    ) -> RenderedExample:
        """Tokenize one {"messages": [...], "tools": [...]} example and mark the tokens training learns from.

        loss_on="assistant" trains the assistant replies (header excluded, end-of-turn
        token included) except those with "weight": 0; loss_on="all" trains every token.
        """
        originals = example["messages"]
        messages, tools = self.template_messages(originals, example.get("tools") or None)
        text = self._apply(messages, tools, generation_prompt=False)
        if loss_on == "all":
            spans = [(0, len(text))]
        else:
            inserted = len(messages) - len(originals)  # a system message carrying the tools
            replies = [
                inserted + i
                for i, message in enumerate(originals)
                if message["role"] == "assistant" and message.get("weight", 1) != 0
            ]
            spans = self._reply_spans(messages, tools, replies, text)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        labels = _labels(input_ids, encoded["offset_mapping"], spans)
        truncated = 0
        if max_seq_len is not None and len(input_ids) > max_seq_len:
            truncated = len(input_ids) - max_seq_len
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        return RenderedExample(input_ids=input_ids, labels=labels, truncated_tokens=truncated)

    def _reply_spans(
        self, messages: list[Message], tools: list[Mapping[str, Any]] | None, replies: list[int], text: str
    ) -> list[tuple[int, int]]:
        """Character spans of the assistant messages at indices replies: _reply_span's, in linear time."""
        if len(replies) <= _PREFIX_RENDERED_REPLIES:
            return [self._reply_span(messages, tools, i, text) for i in replies]
        # The first and the last reply check the marked render against the definition, at linear cost.
        checked = {i: self._reply_span(messages, tools, i, text) for i in (replies[0], replies[-1])}
        read = self._marked_spans(messages, tools, replies, text)
        if read is None or any(read[i] != span for i, span in checked.items()):
            return [checked[i] if i in checked else self._reply_span(messages, tools, i, text) for i in replies]
        return [read[i] for i in replies]

    def _marked_spans(
        self, messages: list[Message], tools: list[Mapping[str, Any]] | None, replies: list[int], text: str
    ) -> dict[int, tuple[int, int]] | None:
        """_reply_span's spans read off one render with marked contents; None where they cannot be.

        Valid where rendering the first k messages renders text up to where message k's
        header begins (the header the template was seen to write for its role), for every k.
        """
        layout = self._layout
        contents = [str(message["content"]) for message in messages]
        if layout is None or _has_marks(text) or any(_has_marks(content) for content in contents):
            return None
        try:
            marked = self._apply(_marked(messages), tools, generation_prompt=False)
        except ChatFormatError:
            return None
        if marked.replace(_OPEN, "").replace(_CLOSE, "") != text:
            return None  # the template changes the content it is given
        starts, cursor = [], 0  # where each message's content begins in text
        for j, content in enumerate(contents):
            opened = marked.find(_OPEN, cursor)
            cursor = opened + 1 + len(content)
            if opened < 0 or marked[opened + 1 : cursor] != content or marked[cursor : cursor + 1] != _CLOSE:
                return None
            starts.append(opened - 2 * j)
            cursor += 1
        if _OPEN in marked[cursor:]:
            return None

        def prefix_end(k: int) -> int | None:
            """Where the render of the first k messages ends in text."""
            if k in (0, len(messages)):
                return 0 if k == 0 else len(text)
            header = layout.headers.get(messages[k]["role"])
            end = starts[k] - len(header or "")
            if header is None or end < starts[k - 1] + len(contents[k - 1]) or not text.startswith(header, end):
                return None
            return end

        spans = {}
        for i in replies:
            before, through = prefix_end(i), prefix_end(i + 1)
            if before is None or through is None:
                return None
            start = before + _common_prefix_length(layout.generation_prompt, text, before) if i else 0
            end = through
            while end > start and text[end - 1].isspace():
                end -= 1
            spans[i] = (start, end)
        return spans

    @cached_property
    def _layout(self) -> _Layout | None:
        """The template's turn headers and generation prompt, learned once from probe conversations."""
        call = {"id": "c1", "type": "function", "function": {"name": "probe_tool_7f3a", "arguments": "{}"}}
        probes: list[list[dict[str, Any]]] = [
            [{"role": "user"}, {"role": "assistant"}, {"role": "user"}, {"role": "assistant"}],
            [{"role": "user"}, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1"}],
        ]
        headers: dict[str, set[str]] = {}
        prompts: set[str] = set()
        for probe in probes:
            originals = [{**turn, "content": f"probe {n}"} for n, turn in enumerate(probe)]
            messages, _ = self.template_messages(originals, None)
            marked = _marked(messages)
            try:
                renders = [self._apply(marked[:k], None, generation_prompt=False) for k in range(len(marked) + 1)]
                prompted = [self._apply(marked[:k], None, generation_prompt=True) for k in range(1, len(marked) + 1)]
            except ChatFormatError:
                continue  # a template that refuses a probe (no tool role, say): its roles stay unlearned
            for k in range(1, len(marked)):
                added = renders[k + 1][len(renders[k]) :]
                if not renders[k + 1].startswith(renders[k]) or _OPEN not in added:
                    return None
                headers.setdefault(marked[k]["role"], set()).add(added[: added.index(_OPEN)])
            for render, with_prompt in zip(renders[1:], prompted, strict=True):
                if not with_prompt.startswith(render):
                    return None
                prompts.add(with_prompt[len(render) :])
        if len(prompts) != 1:
            return None
        # A role seen with two different headers depends on its context: it stays unlearned.
        learned = {role: next(iter(seen)) for role, seen in headers.items() if len(seen) == 1}
        if any(_has_marks(header) for header in learned.values()):
            return None
        return _Layout(headers=learned, generation_prompt=prompts.pop())

    def _reply_span(
        self, messages: list[Message], tools: list[Mapping[str, Any]] | None, i: int, text: str
    ) -> tuple[int, int]:
        """Character span of assistant message i in text: after its header, through its end-of-turn marker."""
        before = self._apply(messages[:i], tools, generation_prompt=True)
        through = self._apply(messages[: i + 1], tools, generation_prompt=False)
        start = len(commonprefix([before, text]))
        end = len(commonprefix([through, text]))
        # Whitespace after the end-of-turn marker is the template's layout, not the reply.
        while end > start and text[end - 1].isspace():
            end -= 1
        return start, end

    def _apply(
        self, messages: list[Message], tools: Sequence[Mapping[str, Any]] | None, *, generation_prompt: bool
    ) -> str:
        if not messages:
            return ""
        extra = {"tools": list(tools)} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
            )
        except ValueError as error:  # transformers' answer when there is no template at all
            if not self.tokenizer.chat_template:
                raise NoChatTemplate(str(error)) from error
            raise ChatFormatError(f"the model's chat template rejected the messages: {error}") from error
        except Exception as error:  # jinja2's TemplateError, raise_exception() in the template, a bad value
            raise ChatFormatError(f"the model's chat template rejected the messages: {error}") from error
        return str(text)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _Layout:
    """What a template writes around messages, as seen in probe conversations."""

    headers: dict[str, str]
    """Role -> the text between the end of the previous message's render and this message's content."""
    generation_prompt: str
    """What add_generation_prompt appends."""


def _marked(messages: list[Message]) -> list[Message]:
    return [{**message, "content": f"{_OPEN}{message['content']}{_CLOSE}"} for message in messages]


def _has_marks(text: str) -> bool:
    return _OPEN in text or _CLOSE in text


def _common_prefix_length(prefix: str, text: str, at: int) -> int:
    """How many characters of prefix text repeats from position at."""
    n = 0
    while n < len(prefix) and at + n < len(text) and prefix[n] == text[at + n]:
        n += 1
    return n


def _labels(input_ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters overlap a span, IGNORE_INDEX elsewhere."""
    tokens = zip(input_ids, offsets, strict=True)
    ordered = all(start < end for start, end in spans) and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    if not ordered:  # spans as an odd template leaves them: test each against each token
        return [
            token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for token, (start, end) in tokens
        ]
    # Sorted, disjoint spans: the only span a token can overlap first is the first one ending after its start.
    starts, ends = [start for start, _ in spans], [end for _, end in spans]
    labels = []
    for token, (start, end) in tokens:
        k = bisect_right(ends, start)
        labels.append(token if k < len(spans) and starts[k] < end else IGNORE_INDEX)
    return labels


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The ChatFormat of a tokenizer, made once per tokenizer and template."""
    return _cached_format(tokenizer, str(tokenizer.chat_template))


@lru_cache(maxsize=16)
def _cached_format(tokenizer: Tokenizer, template: str) -> ChatFormat:
    # Keyed by the template too: a tokenizer's template can be swapped after loading.
    return ChatFormat(tokenizer)


def template_shows_tools(tokenizer: Tokenizer) -> bool:
    """Tell whether the chat template shows the tools it is given (many small models' templates do not)."""
    probe = [{"role": "user", "content": "hello"}]
    try:
        with_tools = tokenizer.apply_chat_template(
            probe, tools=[_PROBE_TOOL], add_generation_prompt=True, tokenize=False
        )
        without = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    # A model's own template can raise anything (jinja2 errors, its raise_exception(), a TypeError on a value);
    # one that cannot render the probe shows no tools.
    except Exception:  # noqa: BLE001
        return False
    return bool(with_tools != without)


def text_of(content: Any) -> str:
    """The text of a message's content: a string, None (empty), or a list of text parts, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            raise ChatFormatError("only text content is supported (this model reads text only)")
        return "".join(part["text"] for part in content)
    raise ChatFormatError(f"content must be a string or a list of text parts, got {type(content).__name__}")


def _plain_message(message: Mapping[str, Any], *, parse_arguments: bool) -> Message:
    plain = {key: message[key] for key in _TEMPLATE_KEYS if key in message}
    if plain.get("role") == "developer":
        plain["role"] = "system"
    plain["content"] = text_of(message.get("content"))
    if not plain.get("tool_calls"):
        plain.pop("tool_calls", None)
    elif parse_arguments:
        # Hugging Face templates expect arguments as a mapping, the OpenAI format sends a JSON string.
        plain["tool_calls"] = [_with_parsed_arguments(call) for call in plain["tool_calls"]]
    return plain


def _with_parsed_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function", {}))
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


def _calls_in_text(message: Message) -> Message:
    if not message.get("tool_calls"):
        return message
    calls = tool_calls_as_text(message["tool_calls"])
    content = f"{message['content']}\n{calls}" if message["content"] else calls
    return {"role": "assistant", "content": content}


def _tools_in_system_message(messages: list[Message], tools: Sequence[Mapping[str, Any]]) -> list[Message]:
    description = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{description}".strip()}, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]
