"""Preference pairs for DPO: render each pair once, pack prompt and both answers into one sequence.

A pair is {"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...], "tools": [...]}, OpenAI's preference format. Both
answers are rendered through the one chat format (`llm.chat`) after the same
conversation, so they share its tokens up to where the answers begin: the prompt.

A packed pair is one segment laid out as  prompt | chosen | rejected.  The
chosen answer follows the prompt as usual; the rejected answer is placed after
it with positions restarting where the prompt ends, and attends to the prompt
and to itself only (`shared_prompt` in the attention below). So one forward
pass computes the prompt once for both answers, and its gradient collects
from both. The first token of each answer is predicted by the prompt's last
position, which is therefore a loss position twice.
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.chat import IGNORE_INDEX, chat_format
from llm.chat.format import Tokenizer

from .config import ConfigError

__all__ = ["PairBatch", "PairSet", "RenderedPair", "load_pairs", "pack_pairs", "render_pair"]

_MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class RenderedPair:
    """One preference pair as DPO training sees it."""

    prompt_ids: list[int]
    """The conversation up to where the answers begin (the assistant header included): shared by both."""
    chosen_ids: list[int]
    """The preferred answer's tokens after the prompt, through its last trained token (end-of-turn marker)."""
    rejected_ids: list[int]
    chosen_trained: list[bool]
    """Per chosen token: whether its log-probability counts (False only for the headers between the
    messages of a multi-message answer)."""
    rejected_trained: list[bool]
    truncated_tokens: int = 0
    """Tokens cut (prompt from its start, answers from their end) to fit max_seq_len."""

    @property
    def tokens(self) -> int:
        """Tokens one packed forward pass of this pair processes."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def render_pair(tokenizer: Tokenizer, example: dict[str, Any], *, max_seq_len: int | None = None) -> RenderedPair:
    """Tokenize one preference pair. Raises ValueError when an answer has no token to learn from."""
    prompt = example["input"]["messages"]
    if not isinstance(prompt, list):
        raise ValueError('"input" must be an object like {"messages": [...]}')
    # Assistant turns of the prompt are context, never trained: only the two answers are compared.
    context = [{**message, "weight": 0} if message.get("role") == "assistant" else message for message in prompt]
    tools = example.get("tools") or None
    renders = {}
    for key in ("preferred_output", "non_preferred_output"):
        answer = example[key]
        if not isinstance(answer, list) or not answer:
            raise ValueError(f"{key} must be a non-empty list of assistant messages")
        answer = [{key: value for key, value in message.items() if key != "weight"} for message in answer]
        rendered = chat_format(tokenizer).render({"messages": context + answer, "tools": tools})
        trained = [label != IGNORE_INDEX for label in rendered.labels]
        if not any(trained):
            raise ValueError(f"{key} has no token to learn from (an empty answer?)")
        renders[key] = (rendered.input_ids, trained)
    (chosen, chosen_mask), (rejected, rejected_mask) = renders["preferred_output"], renders["non_preferred_output"]
    # The prompt ends where the two renders part, and never later than the first trained token of either.
    limit = min(chosen_mask.index(True), rejected_mask.index(True))
    shared = next((i for i, (a, b) in enumerate(zip(chosen[:limit], rejected[:limit], strict=True)) if a != b), limit)
    chosen_end = len(chosen_mask) - chosen_mask[::-1].index(True)
    rejected_end = len(rejected_mask) - rejected_mask[::-1].index(True)
    pair = RenderedPair(
        prompt_ids=chosen[:shared],
        chosen_ids=chosen[shared:chosen_end],
        rejected_ids=rejected[shared:rejected_end],
        chosen_trained=chosen_mask[shared:chosen_end],
        rejected_trained=rejected_mask[shared:rejected_end],
    )
    if not pair.prompt_ids:
        raise ValueError("the two answers do not follow a common prompt")
    return _fit(pair, max_seq_len) if max_seq_len is not None else pair


def _fit(pair: RenderedPair, max_seq_len: int) -> RenderedPair:
    """Cut a pair so prompt + the longer answer fit max_seq_len: the prompt loses its start first
    (the turns nearest the answers matter most), but keeps at least half; then the answers lose their end."""
    prompt, answer = len(pair.prompt_ids), max(len(pair.chosen_ids), len(pair.rejected_ids))
    if prompt + answer <= max_seq_len:
        return pair
    keep_prompt = max(min(prompt, max_seq_len // 2), max_seq_len - answer)
    keep_answer = max_seq_len - keep_prompt
    cut = (prompt - keep_prompt) + max(0, len(pair.chosen_ids) - keep_answer)
    cut += max(0, len(pair.rejected_ids) - keep_answer)
    return RenderedPair(
        prompt_ids=pair.prompt_ids[prompt - keep_prompt :],
        chosen_ids=pair.chosen_ids[:keep_answer],
        rejected_ids=pair.rejected_ids[:keep_answer],
        chosen_trained=pair.chosen_trained[:keep_answer],
        rejected_trained=pair.rejected_trained[:keep_answer],
        truncated_tokens=cut,
    )


@dataclass(frozen=True)
class PairSet:
    """A JSONL file of preference pairs rendered for training."""

    examples: list[RenderedPair]
    total_lines: int
    truncated_examples: int
    skipped_examples: int = 0
    """Always 0: a pair with nothing to learn from is an error, not a pair to skip."""

    @property
    def tokens(self) -> int:
        return sum(pair.tokens for pair in self.examples)


def load_pairs(path: str | Path, tokenizer: Tokenizer, *, max_seq_len: int, name: str = "train_file") -> PairSet:
    """Read and render every pair of a JSONL file; raise ConfigError listing the bad lines."""
    pairs: list[RenderedPair] = []
    problems: list[str] = []
    total = truncated = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            total += 1
            try:
                example = json.loads(line)
                if not isinstance(example, dict) or not isinstance(example.get("input"), dict):
                    raise ValueError(
                        'expected a preference pair {"input": {"messages": [...]}, "preferred_output": [...], '
                        '"non_preferred_output": [...]}'
                        + (' (this line is a chat example: train it with objective "sft")' if _is_chat(example) else "")
                    )
                pair = render_pair(tokenizer, example, max_seq_len=max_seq_len)
            # ValueError: bad JSON or a pair the chat format refuses; the others: a field of the wrong shape.
            except (ValueError, LookupError, TypeError, AttributeError) as error:
                problems.append(f"{name} line {number}: {error}")
                continue
            truncated += pair.truncated_tokens > 0
            pairs.append(pair)
    if total == 0:
        problems.append(f"{name}: {path} holds no preference pairs")
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"{name}: ... and {len(problems) - len(listed)} more bad lines")
        raise ConfigError(listed)
    return PairSet(examples=pairs, total_lines=total, truncated_examples=truncated)


def _is_chat(example: object) -> bool:
    return isinstance(example, dict) and "messages" in example


# --- Packing -------------------------------------------------------------------


@dataclass
class PairBatch:
    """Pairs packed end to end, each as  prompt | chosen | rejected."""

    input_ids: torch.Tensor
    """(1, T)"""
    position_ids: torch.Tensor
    """(1, T): the rejected answer continues from the prompt's end, as if the chosen one were not there."""
    cu_seq_lens: torch.Tensor
    """(pairs + 1,) int32 segment bounds, on the CPU."""
    max_length: int
    shared_prompt: list[tuple[int, int, int, int]]
    """Per pair: (start, prompt end, rejected start, end) in the row."""
    loss_positions: torch.Tensor
    """Positions whose next token is an answer token (the prompt's last position twice per pair)."""
    targets: torch.Tensor
    """The answer token each loss position predicts."""
    slots: torch.Tensor
    """Per loss position: 2 * pair (in this batch) for chosen, + 1 for rejected."""
    pairs: int

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.cu_seq_lens,
            self.max_length,
            self.shared_prompt,
            self.loss_positions.to(device),
            self.targets.to(device),
            self.slots.to(device),
            self.pairs,
        )


def pack_pairs(pairs: list[RenderedPair], token_budget: int) -> list[PairBatch]:
    """Split pairs, in order, into batches of at most token_budget tokens (a pair never splits)."""
    groups: list[list[RenderedPair]] = []
    current: list[RenderedPair] = []
    size = 0
    for pair in pairs:
        if current and size + pair.tokens > token_budget:
            groups.append(current)
            current, size = [], 0
        current.append(pair)
        size += pair.tokens
    if current:
        groups.append(current)
    return [_pair_batch(group) for group in groups]


def _pair_batch(pairs: list[RenderedPair]) -> PairBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    layout: list[tuple[int, int, int, int]] = []
    loss_positions: list[int] = []
    targets: list[int] = []
    slots: list[int] = []
    for k, pair in enumerate(pairs):
        start = len(input_ids)
        prompt = len(pair.prompt_ids)
        rejected_start = start + prompt + len(pair.chosen_ids)
        input_ids += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        positions += range(prompt + len(pair.chosen_ids))
        positions += range(prompt, prompt + len(pair.rejected_ids))
        layout.append((start, start + prompt, rejected_start, len(input_ids)))
        for slot, answer_start, ids, trained in (
            (2 * k, start + prompt, pair.chosen_ids, pair.chosen_trained),
            (2 * k + 1, rejected_start, pair.rejected_ids, pair.rejected_trained),
        ):
            for j, (token, counts) in enumerate(zip(ids, trained, strict=True)):
                if counts:
                    # Token j is predicted by the position before it: the prompt's last for j = 0.
                    loss_positions.append(start + prompt - 1 if j == 0 else answer_start + j - 1)
                    targets.append(token)
                    slots.append(slot)
    lengths = [end - start for start, _, _, end in layout]
    return PairBatch(
        input_ids=torch.tensor([input_ids]),
        position_ids=torch.tensor([positions]),
        cu_seq_lens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        max_length=max(lengths),
        shared_prompt=layout,
        loss_positions=torch.tensor(loss_positions),
        targets=torch.tensor(targets),
        slots=torch.tensor(slots),
        pairs=len(pairs),
    )
