"""Chat examples -> token ids and labels, through the model's own chat template.

Which tokens are trained is decided in character space: the conversation is
rendered once in full, and each assistant reply is located by rendering the
conversation up to it (with the generation prompt, so its header is excluded)
and through it (so its end-of-turn marker is included). Tokens whose
characters overlap a reply are trained. This needs no knowledge of any
particular template, only that rendering a prefix of the conversation renders
a prefix of the text; where a template rewrites earlier turns, the common
prefix is used instead.

Templates that ignore tools get them as text, in the same markup the serving
engine uses, so a model learns to call tools the way it will be prompted.
"""

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from os.path import commonprefix
from pathlib import Path

from deployments_app.serving.prompt import template_has_tools
from deployments_app.serving.tools import describe_tools, tool_calls_as_text

from .config import ConfigError

IGNORE_INDEX = -100
"""Label of a token the loss skips (the convention of torch's cross_entropy and transformers)."""
_MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class RenderedExample:
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


class TemplateRenderer:
    """Renders conversations for one tokenizer; remembers whether its template shows tools."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.shows_tools = _shows_tools(tokenizer, str(tokenizer.chat_template))

    def conversation(self, example: dict) -> tuple[list[dict], list[dict] | None]:
        """Return the messages and tools to hand to the template."""
        tools = example.get("tools") or None
        messages = [_plain_message(message, parse_arguments=self.shows_tools) for message in example["messages"]]
        if self.shows_tools:
            return messages, tools
        messages = [_calls_in_text(message) for message in messages]
        if tools:
            messages = _tools_in_system_message(messages, tools)
        return messages, None

    def text(self, messages: list[dict], tools: list[dict] | None, *, generation_prompt: bool) -> str:
        if not messages:
            return ""
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
        )


def render_example(tokenizer, example: dict, *, loss_on: str = "assistant", max_seq_len: int | None = None) -> RenderedExample:
    """Tokenize one {"messages": [...], "tools": [...]} example and mark the tokens training learns from.

    loss_on="assistant" trains the assistant replies (header excluded, end-of-turn
    token included) except those with "weight": 0; loss_on="all" trains every token.
    """
    renderer = TemplateRenderer(tokenizer)
    messages, tools = renderer.conversation(example)
    text = renderer.text(messages, tools, generation_prompt=False)
    if loss_on == "all":
        spans = [(0, len(text))]
    else:
        inserted = len(messages) - len(example["messages"])  # a system message carrying the tools
        spans = [
            _reply_span(renderer, messages, tools, inserted + i, text)
            for i, message in enumerate(example["messages"])
            if message["role"] == "assistant" and message.get("weight", 1) != 0
        ]

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"])
    ]
    truncated = 0
    if max_seq_len is not None and len(input_ids) > max_seq_len:
        truncated = len(input_ids) - max_seq_len
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    return RenderedExample(input_ids=input_ids, labels=labels, truncated_tokens=truncated)


@lru_cache(maxsize=8)
def _shows_tools(tokenizer, template: str) -> bool:
    # Keyed by the template too: a tokenizer's template can be swapped after loading.
    return template_has_tools(tokenizer)


def _reply_span(renderer: TemplateRenderer, messages, tools, i: int, text: str) -> tuple[int, int]:
    """Character span of assistant message i in text: after its header, through its end-of-turn marker."""
    before = renderer.text(messages[:i], tools, generation_prompt=True)
    through = renderer.text(messages[: i + 1], tools, generation_prompt=False)
    start = len(commonprefix([before, text]))
    end = len(commonprefix([through, text]))
    # Whitespace after the end-of-turn marker is the template's layout, not the reply.
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _plain_message(message: dict, *, parse_arguments: bool) -> dict:
    plain = {key: message[key] for key in ("role", "content", "tool_calls", "tool_call_id", "name") if key in message}
    plain["content"] = _text_of(message.get("content"))
    if plain.get("tool_calls") is None:
        plain.pop("tool_calls", None)
    elif parse_arguments:
        # Hugging Face templates expect arguments as a mapping, the OpenAI format sends a JSON string.
        plain["tool_calls"] = [_with_parsed_arguments(call) for call in plain["tool_calls"]]
    return plain


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            raise ValueError("only text content is supported (this engine trains text-only models)")
        return "".join(part["text"] for part in content)
    raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")


def _with_parsed_arguments(call: dict) -> dict:
    function = dict(call.get("function", {}))
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


def _calls_in_text(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = tool_calls_as_text(message["tool_calls"])
    content = f"{message['content']}\n{calls}" if message["content"] else calls
    return {"role": "assistant", "content": content}


def _tools_in_system_message(messages: list[dict], tools: list[dict]) -> list[dict]:
    description = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{description}".strip()}, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]


# --- Files -------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleSet:
    """A JSONL file rendered for training: only examples with at least one trained token."""

    examples: list[RenderedExample]
    total_lines: int
    truncated_examples: int
    skipped_examples: int
    """Examples with nothing to learn from (all replies weight 0, or cut away by truncation)."""

    @property
    def tokens(self) -> int:
        return sum(len(example.input_ids) for example in self.examples)


def load_examples(path: str | Path, tokenizer, *, loss_on: str, max_seq_len: int, name: str = "train_file") -> ExampleSet:
    """Read and render every example of a JSONL file; raise ConfigError listing the bad lines."""
    examples, problems = [], []
    total = truncated = skipped = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            total += 1
            try:
                example = json.loads(line)
                if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
                    raise ValueError('expected an object with a non-empty "messages" list')
                rendered = render_example(tokenizer, example, loss_on=loss_on, max_seq_len=max_seq_len)
            except Exception as error:  # bad JSON, bad shape, or a template that refuses the conversation
                problems.append(f"{name} line {number}: {error}")
                continue
            truncated += rendered.truncated_tokens > 0
            if rendered.trained_tokens == 0:
                skipped += 1
                continue
            examples.append(rendered)
    if total == 0:
        problems.append(f"{name}: {path} holds no examples")
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"{name}: ... and {len(problems) - len(listed)} more bad lines")
        raise ConfigError(listed)
    return ExampleSet(examples=examples, total_lines=total, truncated_examples=truncated, skipped_examples=skipped)


def epoch_order(count: int, *, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in one epoch: a function of (seed, epoch) only, so resume replays it."""
    order = list(range(count))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order
