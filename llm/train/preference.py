"""Preference pairs for DPO: files of them rendered (`llm.chat.pairs`), packed prompt | chosen | rejected.

A packed pair is one segment laid out as  prompt | chosen | rejected.  The
chosen answer follows the prompt as usual; the rejected answer is placed after
it with positions restarting where the prompt ends, and attends to the prompt
and to itself only (`shared_prompt` in `llm.train.packing`'s attention). So one forward
pass computes the prompt once for both answers, and its gradient collects
from both. The first token of each answer is predicted by the prompt's last
position, which is therefore a loss position twice.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.chat.format import Tokenizer
from llm.chat.pairs import RenderedPair, render_pair

from .data import read_jsonl
from .packing import Packed, plan_groups
from .token_store import PairStore, PairStoreWriter

__all__ = ["PairBatch", "PairSet", "RenderedPair", "load_pairs", "pack_pairs", "render_pair"]


@dataclass(frozen=True)
class PairSet:
    """A JSONL file of preference pairs rendered for training."""

    examples: PairStore
    total_lines: int
    truncated_examples: int
    skipped_examples: int = 0
    """Always 0: a pair with nothing to learn from is an error, not a pair to skip."""

    @property
    def tokens(self) -> int:
        return self.examples.tokens


def load_pairs(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    name: str = "train_file",
    interrupt: Callable[[], None] = lambda: None,
    spill_dir: str | Path | None = None,
) -> PairSet:
    """Read and render every pair of a JSONL file; raise ConfigError listing the bad lines.

    interrupt() is called every few hundred lines: it raises to stop a long read.
    spill_dir: where the rendered tokens' temporary files go (the system's temporary folder when None).
    """
    store = PairStoreWriter(spill_dir)
    truncated = 0

    def keep(pair: RenderedPair) -> None:
        nonlocal truncated
        truncated += pair.truncated_tokens > 0
        store.add(pair)

    def render(example: object) -> RenderedPair:
        if not isinstance(example, dict) or not isinstance(example.get("input"), dict):
            raise ValueError(
                'expected a preference pair {"input": {"messages": [...]}, "preferred_output": [...], '
                '"non_preferred_output": [...]}'
                + (' (this line is a chat example: train it with objective "sft")' if _is_chat(example) else "")
            )
        return render_pair(tokenizer, example, max_seq_len=max_seq_len)

    total = read_jsonl(path, render, keep, name=name, what="preference pairs", interrupt=interrupt)
    return PairSet(examples=store.finish(), total_lines=total, truncated_examples=truncated)


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


def pack_pairs(pairs: Sequence[RenderedPair], token_budget: int) -> Packed[PairBatch]:
    """Split pairs, in order, into batches of at most token_budget tokens (a pair never splits)."""
    sizes = pairs.lengths().tolist() if isinstance(pairs, PairStore) else [pair.tokens for pair in pairs]
    return Packed(plan_groups(sizes, token_budget), lambda group: _pair_batch([pairs[i] for i in group]))


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
