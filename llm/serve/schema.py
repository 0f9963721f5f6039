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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# generate_stream yields str pieces of the answer, then exactly one Completion.
StreamEvent = str | Completion
