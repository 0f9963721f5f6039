"""Training data: JSONL files of chat examples, rendered through the one chat format (`llm.chat`).

`render_example` is `llm.chat.ChatFormat.render`: the tokens and loss mask of one
example. This module reads files of them line by line, names every bad line, keeps
what it rendered in a compact store (`llm.train.token_store`), and orders epochs.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llm.chat import IGNORE_INDEX, RenderedExample, chat_format
from llm.chat.format import LossOn, Tokenizer

from .config import ConfigError
from .token_store import ExampleStore, ExampleStoreWriter

__all__ = ["IGNORE_INDEX", "ExampleSet", "RenderedExample", "epoch_order", "load_examples", "render_example"]

_MAX_LISTED_PROBLEMS = 20
T = TypeVar("T")
CHECK_EVERY_LINES = 256
"""How often a long read asks whether the run was cancelled or paused meanwhile."""


def render_example(
    tokenizer: Tokenizer, example: dict[str, Any], *, loss_on: LossOn = "assistant", max_seq_len: int | None = None
) -> RenderedExample:
    """Tokenize one {"messages": [...], "tools": [...]} example and mark the tokens training learns from."""
    return chat_format(tokenizer).render(example, loss_on=loss_on, max_seq_len=max_seq_len)


# --- Files -------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleSet:
    """A JSONL file rendered for training: only examples with at least one trained token."""

    examples: ExampleStore
    total_lines: int
    truncated_examples: int
    skipped_examples: int
    """Examples with nothing to learn from (all replies weight 0, or cut away by truncation)."""

    @property
    def tokens(self) -> int:
        return self.examples.tokens


def load_examples(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    loss_on: str,
    max_seq_len: int,
    name: str = "train_file",
    interrupt: Callable[[], None] = lambda: None,
    spill_dir: str | Path | None = None,
) -> ExampleSet:
    """Read and render every example of a JSONL file; raise ConfigError listing the bad lines.

    loss_on: "all" trains every token, anything else (the config allows only "assistant") the replies.
    interrupt() is called every CHECK_EVERY_LINES lines: it raises to stop a long read.
    spill_dir: where the rendered tokens' temporary files go (the system's temporary folder when None).
    """
    mode: LossOn = "all" if loss_on == "all" else "assistant"
    store = ExampleStoreWriter(spill_dir)
    counts = {"truncated": 0, "skipped": 0}

    def render(example: object) -> RenderedExample:
        if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
            raise ValueError('expected an object with a non-empty "messages" list')
        return render_example(tokenizer, example, loss_on=mode, max_seq_len=max_seq_len)

    def keep(example: RenderedExample) -> None:
        counts["truncated"] += example.truncated_tokens > 0
        if example.trained_tokens:
            store.add(example)
        else:
            counts["skipped"] += 1

    total = read_jsonl(path, render, keep, name=name, what="examples", interrupt=interrupt)
    return ExampleSet(
        examples=store.finish(),
        total_lines=total,
        truncated_examples=counts["truncated"],
        skipped_examples=counts["skipped"],
    )


def read_jsonl(
    path: str | Path,
    render: Callable[[object], T],
    keep: Callable[[T], None],
    *,
    name: str,
    what: str,
    interrupt: Callable[[], None] = lambda: None,
) -> int:
    """render() each non-blank line of a JSONL file, decoded, and keep() what it made; return the count of lines.

    Raises ConfigError naming every line that is not JSON or that render() refuses (the first
    few, then how many more), or saying that the file holds no `what` at all. Once a line is
    bad, later lines are still checked but no longer kept: the read will fail anyway.
    """
    problems: list[str] = []
    total = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if number % CHECK_EVERY_LINES == 0:
                interrupt()
            if not line.strip():
                continue
            total += 1
            try:
                made = render(json.loads(line))
            # ValueError: bad JSON, a line of the wrong shape, or one the chat format or template refuses
            # (ChatFormatError); the others: a message, tool or tool call that is not an object of the
            # expected shape, met while rendering it.
            except (ValueError, LookupError, TypeError, AttributeError) as error:
                problems.append(f"{name} line {number}: {error}")
                continue
            if not problems:
                keep(made)
    if total == 0:
        problems.append(f"{name}: {path} holds no {what}")
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"{name}: ... and {len(problems) - len(listed)} more bad lines")
        raise ConfigError(listed)
    return total


def epoch_order(count: int, *, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in one epoch: a function of (seed, epoch) only, so resume replays it."""
    order = list(range(count))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order
