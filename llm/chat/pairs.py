"""Preference pairs through the one chat format: the prompt both answers share, then each answer.

A pair is {"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...], "tools": [...]}, OpenAI's preference format. Both
answers are rendered after the same conversation, so they share its tokens up to
where the answers begin: the prompt. DPO training (`llm.train.preference`) runs
the prompt once for both; token statistics count what it runs.
"""

from dataclasses import dataclass
from typing import Any

from .format import IGNORE_INDEX, ChatFormatError, Tokenizer, chat_format

__all__ = ["RenderedPair", "kept_lengths", "render_pair"]


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
    """Tokenize one preference pair. Raises ChatFormatError when an answer has no token to learn from."""
    prompt = example["input"]["messages"]
    if not isinstance(prompt, list):
        raise ChatFormatError('"input" must be an object like {"messages": [...]}')
    # Assistant turns of the prompt are context, never trained: only the two answers are compared.
    context = [{**message, "weight": 0} if message.get("role") == "assistant" else message for message in prompt]
    tools = example.get("tools") or None
    renders = {}
    for key in ("preferred_output", "non_preferred_output"):
        answer = example[key]
        if not isinstance(answer, list) or not answer:
            raise ChatFormatError(f"{key} must be a non-empty list of assistant messages")
        answer = [{key: value for key, value in message.items() if key != "weight"} for message in answer]
        rendered = chat_format(tokenizer).render({"messages": context + answer, "tools": tools})
        trained = [label != IGNORE_INDEX for label in rendered.labels]
        if not any(trained):
            raise ChatFormatError(f"{key} has no token to learn from (an empty answer?)")
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
        raise ChatFormatError("the two answers do not follow a common prompt")
    return _fit(pair, max_seq_len) if max_seq_len is not None else pair


def kept_lengths(prompt: int, answer: int, max_seq_len: int) -> tuple[int, int]:
    """(prompt tokens, answer tokens) a pair keeps when its prompt and longer answer must fit max_seq_len.

    The prompt loses its start first (the turns nearest the answers matter most), but
    keeps at least half of max_seq_len; then the answers lose their end.
    """
    if prompt + answer <= max_seq_len:
        return prompt, answer
    keep_prompt = max(min(prompt, max_seq_len // 2), max_seq_len - answer)
    return keep_prompt, max_seq_len - keep_prompt


def _fit(pair: RenderedPair, max_seq_len: int) -> RenderedPair:
    """The pair cut as kept_lengths says."""
    prompt, answer = len(pair.prompt_ids), max(len(pair.chosen_ids), len(pair.rejected_ids))
    if prompt + answer <= max_seq_len:
        return pair
    keep_prompt, keep_answer = kept_lengths(prompt, answer, max_seq_len)
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
