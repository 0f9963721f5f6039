"""Padding-free packing: the examples of a step laid end to end, attention kept inside each one.

A micro-batch is one row of concatenated examples with positions restarting
at 0 for each, and the boundaries as cumulative lengths (cu_seq_lens, the
flash-attention varlen convention). The model runs with the "packed_sdpa"
attention registered here, which attends within each example only: one
flash-attention varlen call on CUDA when flash_attn is installed, otherwise
one causal SDPA call per example. Per-example calls do no work on the
masked-out blocks a block-diagonal mask would still compute, and need no
L x L mask in memory.

Only trained positions are sent through the LM head (logits_to_keep): with a
49k vocabulary the logits of untrained tokens would cost more than the rest.
"""

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .data import IGNORE_INDEX, RenderedExample
from .hf import TrainableModel
from .token_store import BuiltWhenRead, ExampleStore

if TYPE_CHECKING:
    from .preference import PairBatch

ATTENTION = "packed_sdpa"

try:  # optional CUDA kernel; never present on CPU machines
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """(1, T) the examples laid end to end."""
    position_ids: torch.Tensor
    """(1, T) restarting at 0 for each example."""
    cu_seq_lens: torch.Tensor
    """(examples + 1,) int32 cumulative lengths: example k spans cu_seq_lens[k]:cu_seq_lens[k+1].
    Stays on the CPU: the per-example attention reads it in every layer, and reading a GPU
    tensor would make each layer wait for the GPU."""
    max_length: int
    loss_positions: torch.Tensor
    """Indices into the row whose next token is trained."""
    targets: torch.Tensor
    """The token each loss position must predict."""

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.cu_seq_lens,
            self.max_length,
            self.loss_positions.to(device),
            self.targets.to(device),
        )


Batch = TypeVar("Batch")


class Packed(BuiltWhenRead[Batch]):
    """Micro-batches planned at once and built when read, so a whole file's never sit in memory together."""

    def __init__(self, groups: list[range], build: Callable[[range], Batch]) -> None:
        self.groups, self.build = groups, build

    def __len__(self) -> int:
        return len(self.groups)

    def _item(self, index: int) -> Batch:
        return self.build(self.groups[index])


def plan_groups(sizes: Iterable[int], token_budget: int) -> list[range]:
    """Split items of these sizes, in order, into runs of at most token_budget tokens (an item never splits)."""
    groups: list[range] = []
    start = size = count = 0
    for index, length in enumerate(sizes):
        if index > start and size + length > token_budget:
            groups.append(range(start, index))
            start, size = index, 0
        size += length
        count = index + 1
    if count > start:
        groups.append(range(start, count))
    return groups


def pack(examples: Sequence[RenderedExample], token_budget: int) -> Packed[MicroBatch]:
    """Split examples, in order, into micro-batches of at most token_budget tokens (one example never splits)."""
    sizes = examples.lengths().tolist() if isinstance(examples, ExampleStore) else [len(e.input_ids) for e in examples]
    return Packed(plan_groups(sizes, token_budget), lambda group: _micro_batch([examples[i] for i in group]))


def _micro_batch(examples: list[RenderedExample]) -> MicroBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    target_ids: list[int] = []
    lengths: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        input_ids += example.input_ids
        positions += range(n)
        # Position i predicts token i + 1 of the same example; an example's last position predicts nothing.
        target_ids += example.labels[1:] + [IGNORE_INDEX]
        lengths.append(n)
    targets = torch.tensor(target_ids)
    loss_positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return MicroBatch(
        input_ids=torch.tensor([input_ids]),
        position_ids=torch.tensor([positions]),
        cu_seq_lens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        max_length=max(lengths),
        loss_positions=loss_positions,
        targets=targets[loss_positions],
    )


def trained_logits(model: TrainableModel, batch: "MicroBatch | PairBatch") -> torch.Tensor:
    """Run the model on a packed micro-batch (of examples, or of preference pairs); return (loss positions, vocab) logits."""
    output = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seq_lens_q=batch.cu_seq_lens,
        cu_seq_lens_k=batch.cu_seq_lens,
        max_length_q=batch.max_length,
        max_length_k=batch.max_length,
        shared_prompt=getattr(batch, "shared_prompt", None),
        logits_to_keep=batch.loss_positions,
        use_cache=False,
    )
    logits: torch.Tensor = output.logits[0]
    return logits


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    shared_prompt: list[tuple[int, int, int, int]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed example; query (1, heads, T, dim) -> (1, T, heads, dim).

    shared_prompt (preference pairs, llm.train.preference): per segment (start, prompt end,
    rejected start, end); the part from rejected start attends to the prompt and to itself only.
    """
    if shared_prompt is not None:
        return _shared_prompt_attention(query, key, value, shared_prompt, dropout, scaling), None
    if cu_seq_lens_q is None:  # an unpacked call (one sequence): plain causal attention
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], dtype=torch.int32)
        max_length_q = query.shape[2]
    if flash_attn_varlen_func is not None and query.is_cuda:
        if max_length_q is None:  # transformers passes it with cu_seq_lens_q; flash_attn needs it
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        return _flash_varlen(query, key, value, cu_seq_lens_q, max_length_q, dropout, scaling), None
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
        )
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2), None


def _shared_prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: list[tuple[int, int, int, int]],
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    outputs = []
    for start, prompt_end, rejected_start, end in layout:
        # prompt | chosen: plain causal attention.
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:rejected_start],
                key[:, :, start:rejected_start],
                value[:, :, start:rejected_start],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
            )
        )
        # rejected: every prompt key, then its own keys causally; the chosen answer stays unseen.
        prompt, rejected = prompt_end - start, end - rejected_start
        mask = torch.ones(rejected, prompt + rejected, dtype=torch.bool, device=query.device)
        mask[:, prompt:] = torch.ones(rejected, rejected, dtype=torch.bool, device=query.device).tril()
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, rejected_start:end],
                torch.cat([key[:, :, start:prompt_end], key[:, :, rejected_start:end]], dim=2),
                torch.cat([value[:, :, start:prompt_end], value[:, :, rejected_start:end]], dim=2),
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (tensor[0].transpose(0, 1).to(dtype) for tensor in (query, key, value))
    cu_seq_lens = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    out: torch.Tensor = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return out.unsqueeze(0).to(query.dtype)


AttentionInterface.register(ATTENTION, packed_attention)
