"""Constrained decoding: the grammar an answer must follow, and one request's matcher over it.

A `response_format` of json_object or json_schema, and a tool_choice of "required" or a
named function, are kept by a grammar rather than by asking nicely: at every step the
matcher says which tokens may come next, the engine masks the rest out before it picks,
and the chosen token advances the matcher. The grammars are written in llguidance's Lark
dialect, whose `%json` rule embeds a JSON schema, so a forced tool call is the same
`<tool_call>{...}</tool_call>` markup `llm.chat.tools.parse_tool_calls` reads, with
its body held to the tool's own parameter schema.

JSON is kept compact (no free whitespace): a small model left free to emit whitespace
between tokens can fill its whole budget with it.
"""

import json
import threading
from collections.abc import Iterable
from typing import Any

import torch

from llm.chat.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_schema

from .errors import InvalidRequest
from .schema import GenerationRequest

_COMPACT = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


def grammar_text(request: GenerationRequest) -> str | None:
    """The Lark grammar this request's answer must follow, or None when it is free text."""
    answer = _answer_rule(request.response_format)
    calls = _calls_rule(request)
    forced = request.offered_tools and request.tool_choice not in (None, "auto", "none")
    if forced and calls:
        return f"start: calls\n{calls}"
    if answer is None:
        return None
    if calls:  # tool_choice auto with a response format: a tool call, or an answer in that format
        return f"start: calls | answer\n{calls}\n{answer}"
    return f"start: answer\n{answer}"


def _answer_rule(response_format: dict[str, Any] | None) -> str | None:
    kind = (response_format or {}).get("type") or "text"
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    elif kind == "json_schema":
        spec = (response_format or {}).get("json_schema") or {}
        schema = dict(spec.get("schema") or {"type": "object"})
    else:
        raise InvalidRequest([f"response_format type {kind!r} is not supported"], param="response_format")
    return f"answer: %json {_json({**schema, 'x-guidance': _COMPACT})}"


def _calls_rule(request: GenerationRequest) -> str | None:
    tools = request.offered_tools
    if not tools:
        return None
    name = None
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice.get("function", {}).get("name")
    body = {**tool_call_schema(tools, name=name), "x-guidance": _COMPACT}
    repeat = ' ("\\n" call)*' if request.parallel_tool_calls and name is None else ""
    return (
        f"calls: call{repeat}\n"
        f"call: {_json(TOOL_CALL_OPEN)} call_body {_json(TOOL_CALL_CLOSE)}\n"
        f"call_body: %json {_json(body)}"
    )


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


class GrammarCompiler:
    """Turns grammars into matchers for one model's tokenizer; the tokenizer's index is built once, on first use."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, end_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._end_token_ids = sorted(end_token_ids)
        self._index: Any = None
        self._lock = threading.Lock()

    def matcher(self, grammar: str, device: torch.device, *, param: str) -> "GrammarMatcher":
        """A fresh matcher at the grammar's start; a grammar that does not compile is a 400 naming `param`."""
        import llguidance

        index = self._tokenizer_index()
        matcher = llguidance.LLMatcher(index, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=1)
        if matcher.is_error():
            raise InvalidRequest([f"the answer's format cannot be decoded: {matcher.get_error()}"], param=param)
        return GrammarMatcher(matcher, index.vocab_size, device)

    def _tokenizer_index(self) -> Any:
        with self._lock:
            if self._index is None:
                import llguidance.hf

                self._index = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self._vocab_size, eos_token=self._end_token_ids or None
                )
            return self._index


class GrammarMatcher:
    """One answer's place in its grammar: masks a row's scores, then follows the token picked."""

    def __init__(self, matcher: Any, vocab_size: int, device: torch.device) -> None:
        import llguidance.torch

        self._matcher = matcher
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._device = device

    def mask(self, scores: torch.Tensor) -> None:
        """Set the score of every token the grammar forbids next to -inf, in place (scores: one row).

        The bitmask (bit i of word w allows token 32w+i) is unpacked with plain tensor operations:
        llguidance's own torch kernel is TorchScript, which takes seconds to compile on first use
        and tens of milliseconds a call on a CPU, against well under one here.
        """
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        allowed = ((self._bitmask[0].unsqueeze(-1) >> _BITS) & 1).flatten().bool()
        width = scores.shape[-1]
        if allowed.numel() < width:
            allowed = torch.cat([allowed, allowed.new_zeros(width - allowed.numel())])
        scores.masked_fill_(~allowed[:width].to(scores.device, non_blocking=True), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar allows nothing more: the answer is complete."""
        return bool(self._matcher.is_stopped())
