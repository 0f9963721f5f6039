"""What crosses the serving boundary: a request in, text pieces and one Completion out."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    base_path: str
    """Folder of the base model: weights, tokenizer and chat template."""
    adapter_path: str | None = None
    """Folder of a LoRA adapter saved by peft, or None to answer with the base model alone."""
    messages: list[dict[str, Any]]
    """OpenAI-style chat messages: {"role", "content"} plus tool_calls / tool_call_id where relevant."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI-style tool definitions: [{"type": "function", "function": {"name", ...}}]."""
    max_tokens: int = 256
    """The most tokens to generate; reaching it ends with finish_reason "length"."""
    temperature: float = 1.0
    """0 (or do_sample=False) means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample only among the most likely tokens holding this much probability."""
    stop: list[str] | str | None = None
    """Strings that end the completion; they are never part of the returned text."""
    seed: int | None = None
    """The same seed with the same request gives the same completion."""
    do_sample: bool = True
    """False forces greedy decoding whatever the temperature (zhipuai sends this)."""
    presence_penalty: float = 0.0
    """Subtracted from the score of every token already generated (OpenAI's formula, -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's score once per time it was already generated (OpenAI's formula, -2..2)."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as JSON keys are) -> a number added to its score before sampling."""
    logprobs: bool = False
    """Return each chosen token's log-probability (see processors.py for which scores)."""
    top_logprobs: int = 0
    """With logprobs: also the this many most likely tokens at each position."""
    response_format: dict[str, Any] | None = None
    """OpenAI's {"type": "text" | "json_object" | "json_schema", ...}: JSON answers are decoded under a grammar."""
    tool_choice: str | dict[str, Any] | None = None
    """None or "auto": the model may call tools; "none": tools are not offered; "required" or
    {"type": "function", "function": {"name"}}: the answer is a tool call (decoded under a grammar)."""
    parallel_tool_calls: bool = True
    """False: at most one tool call per answer."""

    @property
    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown: none when tool_choice is "none"."""
        return None if self.tool_choice == "none" else self.tools

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


@dataclass(frozen=True)
class Completion:
    """The last event of a stream: why it ended, token counts and the parsed tool calls."""

    content: str
    """The whole answer text, stop strings and tool-call markup removed."""
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (max_tokens reached) or "tool_calls"."""
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI-shaped: [{"id", "type": "function", "function": {"name", "arguments": "<json>"}}]."""
    logprobs: list[dict[str, Any]] | None = None
    """With GenerationRequest.logprobs: one OpenAI-shaped entry per generated token (the end of turn left out)."""
    index: int = 0
    """Which of a request's n choices this is."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TextPiece(str):
    """A piece of answer text that also carries the logprobs of the tokens it completes (and its choice index).

    A str, so every consumer that reads pieces as text goes on working unchanged; an
    empty TextPiece may carry the logprobs of tokens whose text was held back.
    """

    logprobs: list[dict[str, Any]]
    choice: int
    """Which of the request's n choices it belongs to (`index` is str's own)."""

    def __new__(cls, text: str, logprobs: list[dict[str, Any]] | None = None, choice: int = 0) -> "TextPiece":
        piece = super().__new__(cls, text)
        piece.logprobs = list(logprobs or [])
        piece.choice = choice
        return piece


def piece_logprobs(piece: str) -> list[dict[str, Any]]:
    """The logprobs a piece carries (none for a plain str)."""
    return piece.logprobs if isinstance(piece, TextPiece) else []


def piece_index(piece: str) -> int:
    """The choice a piece belongs to (0 for a plain str)."""
    return piece.choice if isinstance(piece, TextPiece) else 0


# generate_stream yields str pieces of the answer (TextPiece when they carry logprobs), then exactly one Completion.
StreamEvent = str | Completion
