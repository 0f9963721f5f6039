"""Keys and values of running sequences, one row each, and the attention that reads them.

A `SlotKV` holds, per layer, one key and one value tensor shaped (rows, kv heads,
capacity, head dim). A sequence owns one row and its tokens sit at positions
0..length-1 of it, so rows of different lengths live side by side. Each forward
pass writes the new tokens' keys and values at each row's own positions, and
attends over the rows' first `max length` positions with a mask that hides each
row's unused tail.

The model runs with the attention implementation "ft_slots" registered here. It
does not use transformers' cache at all: the engine says which store, rows and
positions a forward pass uses with `attending`, and the attention function finds
them there.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

ATTENTION = "ft_slots"
_GROW = 64
"""Capacity grows in steps of at least this many positions."""


class SlotKV:
    """Per-layer key and value rows for up to `rows` sequences, growing in length as they do."""

    def __init__(
        self, *, rows: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.rows, self.layers, self.kv_heads, self.head_dim = rows, layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._reserve(_GROW, rows)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def nbytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    def ensure(self, length: int) -> None:
        """Make room for positions 0..length-1 in every row (the rows' content is kept)."""
        if length > self.capacity:
            self._reserve(max(length, self.capacity * 2), self.rows)

    def ensure_rows(self, rows: int) -> None:
        """Make room for `rows` rows (the rows' content is kept)."""
        if rows > self.rows:
            self._reserve(self.capacity, max(rows, self.rows * 2))

    def shrink(self, length: int) -> None:
        """Give back memory past `length` positions (when the long sequences have finished)."""
        target = max(_GROW, -(-length // _GROW) * _GROW)
        if target * 4 <= self.capacity:
            self._reserve(target, self.rows)

    def copy_row(self, source: "SlotKV", source_row: int, row: int, length: int) -> None:
        """Copy the first `length` positions of another store's row into this store's row."""
        self.ensure(length)
        for layer in range(self.layers):
            self.keys[layer][row, :, :length] = source.keys[layer][source_row, :, :length]
            self.values[layer][row, :, :length] = source.values[layer][source_row, :, :length]

    def move_row(self, source_row: int, row: int, length: int) -> None:
        """Move a row within this store (to keep the running rows packed at the top)."""
        self.copy_row(self, source_row, row, length)

    def _reserve(self, capacity: int, rows: int) -> None:
        capacity = -(-capacity // _GROW) * _GROW
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        keep, kept_rows = min(self.capacity, capacity), min(self.rows, rows) if self.keys else 0
        keys, values = [], []
        for layer in range(self.layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if keep and kept_rows:
                k[:kept_rows, :, :keep] = self.keys[layer][:kept_rows, :, :keep]
                v[:kept_rows, :, :keep] = self.values[layer][:kept_rows, :, :keep]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self.capacity, self.rows = keys, values, capacity, rows


@dataclass(frozen=True)
class Attending:
    """What one forward pass attends with: the store, its rows, where each row's new tokens go, and the mask."""

    store: SlotKV
    rows: slice | torch.Tensor
    """slice(0, B) when the batch is the store's first B rows (no copy), else a tensor of row indices."""
    starts: list[int]
    """Per batch row: the position of its first new token (its length before this pass)."""
    new_tokens: list[int]
    """Per batch row: how many of the pass's query positions are real (the rest is padding)."""
    length: int
    """Positions attended: the longest row's length after this pass."""
    mask: torch.Tensor
    """(B, 1, Q, length) boolean, True where a query may look."""
    bias: torch.Tensor
    """The mask as float32 to add to the scores: 0 where a query may look, -inf elsewhere."""
    write_rows: torch.Tensor
    """(B,) the store row of each batch row."""
    write_at: torch.Tensor
    """(B,) the position each batch row's first new token goes to (= starts)."""


_ATTENDING: ContextVar[Attending | None] = ContextVar("attending", default=None)


@contextmanager
def attending(
    store: SlotKV, rows: slice | list[int], starts: list[int], new_tokens: list[int], query_length: int
) -> Iterator[Attending]:
    """Set up one forward pass over `rows` of `store`, whose rows hold `starts` tokens and get `new_tokens` more."""
    length = max(start + count for start, count in zip(starts, new_tokens, strict=True))
    store.ensure(max(length, max(starts) + query_length))
    device = store.device
    start = torch.tensor(starts, device=device).view(-1, 1, 1, 1)
    count = torch.tensor(new_tokens, device=device).view(-1, 1, 1, 1)
    query = torch.arange(query_length, device=device).view(1, 1, -1, 1)
    key = torch.arange(length, device=device).view(1, 1, 1, -1)
    # A real query token sees its row's keys up to its own position; a padding query sees
    # position 0 only (it must see something, or its softmax is 0/0; its output is dropped).
    mask = torch.where(query < count, key <= start + query, key == 0)
    if isinstance(rows, slice):
        index: slice | torch.Tensor = rows
        write_rows = torch.arange(rows.start or 0, rows.stop, device=device)
    else:
        index = write_rows = torch.tensor(rows, dtype=torch.long, device=device)
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
    context = Attending(store, index, list(starts), list(new_tokens), length, mask, bias, write_rows, start.view(-1))
    token = _ATTENDING.set(context)
    try:
        yield context
    finally:
        _ATTENDING.reset(token)


def positions(starts: list[int], query_length: int, device: torch.device) -> torch.Tensor:
    """(B, Q) position ids: each row counts on from its own length."""
    return torch.tensor(starts, device=device).view(-1, 1) + torch.arange(query_length, device=device).view(1, -1)


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: store the new keys and values in their rows, attend over the rows."""
    context = _ATTENDING.get()
    if context is None:
        raise RuntimeError("a model set up for batched serving ran outside the engine (no rows to attend over)")
    layer = module.layer_idx
    store = context.store
    keys, values = store.keys[layer], store.values[layer]
    key, value = key.to(keys.dtype), value.to(values.dtype)
    query_length = key.shape[2]
    if query_length == 1:  # decoding: one scatter writes every row's new token
        keys[context.write_rows, :, context.write_at] = key[:, :, 0]
        values[context.write_rows, :, context.write_at] = value[:, :, 0]
    else:
        row_ids = context.write_rows.tolist()
        for i, (row, start, count) in enumerate(zip(row_ids, context.starts, context.new_tokens, strict=True)):
            keys[row, :, start : start + count] = key[i, :, :count]
            values[row, :, start : start + count] = value[i, :, :count]
    k = keys[context.rows, :, : context.length]
    v = values[context.rows, :, : context.length]
    if query.device.type == "cpu":
        out = _grouped_attention(query.to(k.dtype), k, v, context.bias, scaling).to(query.dtype)
    else:
        out = functional.scaled_dot_product_attention(
            query, k, v, attn_mask=context.mask, scale=scaling, enable_gqa=query.shape[1] != k.shape[1]
        )
    return out.transpose(1, 2).contiguous(), None


def _grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention with the query heads that share a key head stacked as one matrix (no copies of keys).

    On the CPU this beats scaled_dot_product_attention for the engine's shapes (a few query
    positions over strided rows of the store), and by far in bfloat16, so the store is float32.
    """
    batch, heads, query_length, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, group * query_length, head_dim)
    scores = torch.matmul(stacked, keys.transpose(-1, -2)) * (scaling if scaling is not None else head_dim**-0.5)
    if query_length > 1:  # the stacked rows are (group, query) pairs: each query's bias, once per group
        bias = bias.unsqueeze(2).expand(batch, 1, group, query_length, bias.shape[-1])
        bias = bias.reshape(batch, 1, group * query_length, -1)
    scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out.reshape(batch, heads, query_length, head_dim)


def register() -> None:
    """Make "ft_slots" an attention implementation transformers models can be switched to."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, slot_attention)
