"""Token statistics of a dataset: lengths, trained and billable tokens, truncation.

A second, optional pass after validation, slower because it needs the base
model's tokenizer. Examples are rendered by the one chat format (`llm.chat`),
exactly as training renders them, so trained and billable tokens are the ones
training will see; a preference pair counts as the one packed sequence DPO
runs (`llm.train.preference`): its input once, then both answers, trained.
Plain Python (no Django); transformers is only used through the tokenizer given.
"""

import json
import math
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from datasets_app.formats import InvalidExample, Issue, normalize_example
from llm.chat import ChatFormatError, chat_format
from llm.chat.pairs import kept_lengths, render_pair

IMAGE_TOKENS = 1024
"""What one image counts for, whatever its size."""
HISTOGRAM_BINS = 20
# Maximum sequence lengths at which billable tokens are counted exactly, so that a job
# with any max_seq_len (32 to 32,768) gets an estimate without counting again.
BILLABLE_CAPS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PROGRESS_EVERY = 100
"""How many examples are counted between two calls of token_statistics' progress callback."""


def token_statistics(
    lines: Iterable,
    tokenizer,
    *,
    max_seq_len: int,
    max_listed: int = 100,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Count the tokens of each example in lines and describe them for a page and a cost estimate.

    lines holds JSON lines (bytes or str, as from iterating a file) or decoded
    dicts, in any accepted format; invalid ones are skipped. Warning line
    numbers count every item, blank lines included, so they match the file.
    An example the chat template refuses is skipped with a warning: training
    would refuse it too. progress, when given, is called with the number of
    examples read so far every PROGRESS_EVERY examples.
    """
    lengths = array("I")
    totals = {"total": 0, "trained": 0, "billable": 0, "images": 0, "lost": 0, "over": 0, "skipped": 0, "refused": 0}
    caps = sorted({*BILLABLE_CAPS, max_seq_len})
    billable_at = dict.fromkeys(caps, 0)
    warnings: list[Issue] = []
    for read, (number, example) in enumerate(_numbered_examples(lines), start=1):
        if progress is not None and read % PROGRESS_EVERY == 0:
            progress(read)
        if example is None:
            totals["skipped"] += 1
            continue
        try:
            counted = training_tokens(example, tokenizer)
        except ChatFormatError as refusal:
            totals["skipped"] += 1
            totals["refused"] += 1
            if len(warnings) < max_listed:
                warnings.append(
                    Issue(number, "", "template_refused", f"training cannot render this example: {refusal}")
                )
            continue
        billable = counted.tokens_at(max_seq_len)
        totals["total"] += counted.total
        totals["billable"] += billable
        for cap in caps:
            billable_at[cap] += counted.tokens_at(cap)
        totals["trained"] += counted.trained_at(max_seq_len)
        totals["images"] += counted.images
        totals["lost"] += counted.total - billable
        lengths.append(counted.length)
        if counted.length > max_seq_len:
            totals["over"] += 1
            if len(warnings) < max_listed:
                what = "pair (its input and its longer answer)" if isinstance(counted, PairTokens) else "example"
                message = (
                    f"the {what} is {counted.length:,} tokens, longer than the maximum sequence length "
                    f"{max_seq_len:,}: {counted.total - billable:,} tokens will be cut off"
                )
                warnings.append(Issue(number, "", "too_long", message))
    ordered = sorted(lengths)
    return {
        "examples": len(ordered),
        "skipped": totals["skipped"],
        "tokens_per_example": {
            "mean": round(sum(ordered) / len(ordered), 1) if ordered else 0,
            "p50": _percentile(ordered, 0.50),
            "p95": _percentile(ordered, 0.95),
            "max": ordered[-1] if ordered else 0,
        },
        "histogram": length_histogram(ordered),
        "total_tokens": totals["total"],
        "trained_tokens": totals["trained"],
        "billable_tokens": totals["billable"],
        "billable_tokens_by_max_seq_len": {str(cap): count for cap, count in billable_at.items()},
        "images": totals["images"],
        "image_tokens": totals["images"] * IMAGE_TOKENS,
        "max_seq_len": max_seq_len,
        "examples_over_max_seq_len": totals["over"],
        "tokens_lost": totals["lost"],
        "warnings": [issue.to_dict() for issue in warnings],
        "warning_counts": {
            kind: count
            for kind, count in (("too_long", totals["over"]), ("template_refused", totals["refused"]))
            if count
        },
    }


def billable_tokens_at(stats: dict, max_seq_len: int) -> int | None:
    """Billable tokens per epoch if examples are cut at max_seq_len, from stats of token_statistics.

    Exact at the lengths counted (BILLABLE_CAPS and the stats' own); in between, a
    straight line between the two nearest, which can only undercount a little:
    sum(min(length, cap)) grows ever more slowly with cap. None when nothing was counted.
    """
    table = {int(cap): count for cap, count in (stats.get("billable_tokens_by_max_seq_len") or {}).items()}
    if not table:
        return stats.get("billable_tokens")  # counted before the table existed: the best there is
    if max_seq_len in table:
        return table[max_seq_len]
    below = max((cap for cap in table if cap < max_seq_len), default=None)
    above = min((cap for cap in table if cap > max_seq_len), default=None)
    if above is None:
        return table[below]  # only past 32,768, the largest max_seq_len a job may have
    if below is None:
        return round(table[above] * max_seq_len / above)
    share = (max_seq_len - below) / (above - below)
    return round(table[below] + share * (table[above] - table[below]))


def estimate_cost(billable_tokens: int, epochs: int, price_per_1k: float) -> float:
    """Return the price of training on billable_tokens for epochs at price_per_1k tokens."""
    if billable_tokens < 0 or epochs < 0 or price_per_1k < 0:
        raise ValueError("billable_tokens, epochs and price_per_1k must not be negative")
    return billable_tokens * epochs * price_per_1k / 1000


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> dict:
    """Bin lengths into at most `bins` equal bins of a round width: {"edges": [...], "counts": [...]}.

    edges has one more item than counts; bin i holds edges[i] <= length < edges[i + 1].
    """
    if not lengths:
        return {"edges": [], "counts": []}
    width = _round_width(max(lengths) / bins)
    counts = [0] * (max(lengths) // width + 1)
    for length in lengths:
        counts[length // width] += 1
    return {"edges": [width * i for i in range(len(counts) + 1)], "counts": counts}


def _round_width(raw: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least raw."""
    if raw <= 1:
        return 1
    power = 10 ** math.floor(math.log10(raw))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= raw)


def _percentile(ordered: list[int], fraction: float) -> int:
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _numbered_examples(lines: Iterable):
    for number, line in enumerate(lines, start=1):
        if isinstance(line, (bytes, str)):
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            text = text.strip().lstrip("\ufeff")
            if not text:
                continue
            try:
                line = json.loads(text)
            except ValueError:
                yield number, None
                continue
        try:
            example, _ = normalize_example(line) if isinstance(line, dict) else (None, None)
        except InvalidExample:
            example = None
        yield number, example


def training_sequences(example: dict) -> list[dict]:
    """The conversations an example holds: itself for chat, the input with each answer for a preference pair.

    The input's assistant turns get weight 0: DPO learns from the two answers only.
    """
    if "messages" in example:
        return [example]
    tools = {"tools": example["tools"]} if "tools" in example else {}
    prompt = [
        {**message, "weight": 0} if message["role"] == "assistant" else message
        for message in example["input"]["messages"]
    ]
    return [{"messages": prompt + example[key], **tools} for key in ("preferred_output", "non_preferred_output")]


@dataclass(frozen=True)
class ChatTokens:
    """A chat example as training runs it: one sequence, cut at its end."""

    mask: list[int]
    """The loss mask of the rendered conversation, images left out."""
    images: int = 0
    trained_images: int = 0

    @property
    def total(self) -> int:
        return len(self.mask) + IMAGE_TOKENS * self.images

    @property
    def length(self) -> int:
        """What max_seq_len must hold."""
        return self.total

    def tokens_at(self, max_seq_len: int) -> int:
        return min(self.total, max_seq_len)

    def trained_at(self, max_seq_len: int) -> int:
        return sum(self.mask[:max_seq_len]) + IMAGE_TOKENS * self.trained_images


@dataclass(frozen=True)
class PairTokens:
    """A preference pair as DPO training runs it (llm.train.preference): prompt | chosen | rejected.

    One packed sequence: the prompt once, then each answer through its last
    trained token. The rejected answer restarts where the prompt ends and attends
    to it only, so max_seq_len must hold the prompt and the longer answer.
    """

    prompt: int
    """Tokens shared ahead of the answers: the input and the assistant header."""
    chosen: list[int]
    """The loss mask of the preferred answer."""
    rejected: list[int]
    images: int = 0
    trained_images: int = 0

    @property
    def total(self) -> int:
        return self.prompt + len(self.chosen) + len(self.rejected) + IMAGE_TOKENS * self.images

    @property
    def length(self) -> int:
        return self.prompt + self._longer + IMAGE_TOKENS * self.images

    @property
    def _longer(self) -> int:
        return max(len(self.chosen), len(self.rejected))

    def tokens_at(self, max_seq_len: int) -> int:
        prompt, answer = kept_lengths(self.prompt, self._longer, max_seq_len)
        kept = prompt + min(len(self.chosen), answer) + min(len(self.rejected), answer)
        return kept + IMAGE_TOKENS * self.images

    def trained_at(self, max_seq_len: int) -> int:
        _, answer = kept_lengths(self.prompt, self._longer, max_seq_len)
        return sum(self.chosen[:answer]) + sum(self.rejected[:answer]) + IMAGE_TOKENS * self.trained_images


def training_tokens(example: dict, tokenizer) -> ChatTokens | PairTokens:
    """Render an example as training does and keep what counting its tokens needs."""
    if "messages" in example:
        return ChatTokens(
            chat_format(tokenizer).render(without_images(example)).loss_mask, *count_images(example["messages"])
        )
    text_only = {
        **example,
        "input": {**example["input"], "messages": _text_only(example["input"]["messages"])},
        **{key: _text_only(example[key]) for key in ("preferred_output", "non_preferred_output")},
    }
    pair = render_pair(tokenizer, text_only)
    input_images, _ = count_images(example["input"]["messages"])
    answers = [count_images(example[key]) for key in ("preferred_output", "non_preferred_output")]
    return PairTokens(
        len(pair.prompt_ids),
        [int(trained) for trained in pair.chosen_trained],
        [int(trained) for trained in pair.rejected_trained],
        images=input_images + sum(count for count, _ in answers),
        trained_images=sum(trained for _, trained in answers),
    )


def count_images(messages: list[dict]) -> tuple[int, int]:
    """How many images the messages hold, and how many of them sit in trained assistant replies."""
    count = trained = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            found = sum(1 for part in content if part.get("type") == "image_url")
            count += found
            if message["role"] == "assistant" and message.get("weight", 1) != 0:
                trained += found
    return count, trained


def without_images(example: dict) -> dict:
    """The chat example with each list content cut down to its text parts, joined.

    The training engine's renderer is text-only and refuses image parts; images
    are counted apart, IMAGE_TOKENS each, so dropping them here loses nothing.
    An assistant image reply (text-to-image) becomes an empty reply.
    """
    return {**example, "messages": _text_only(example["messages"])}


def _text_only(messages: list[dict]) -> list[dict]:
    return [
        {
            **message,
            "content": "".join(part.get("text", "") for part in message["content"] if part.get("type") == "text"),
        }
        if isinstance(message.get("content"), list)
        else message
        for message in messages
    ]
