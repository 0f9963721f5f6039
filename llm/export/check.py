"""The export check: do the exported models answer as the fine-tuned model does?

A fixed set of probe prompts is answered with greedy decoding by the reference
(the base with its adapter, as the console serves it) and by each export (the
merged model, a GGUF file read back by transformers). Greedy answers are
deterministic, so any difference comes from the export: none is expected from the
merged model or an f16 GGUF beyond half-precision rounding, while q8_0 rounds every
weight to 8 bits and may change a word where two were nearly tied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .gguf import end_of_turn_id

PROBES = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is 12 plus 30?",
)
"""Short prompts of different kinds: a fact, free text, a list, arithmetic."""

MAX_NEW_TOKENS = 24

Loader = Callable[[], tuple[Any, Any]]
"""Loads a model and its tokenizer when called (one model is held in memory at a time)."""


def greedy_answer(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy answer to one user message, rendered with its own chat template."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    stop = {end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    with torch.inference_mode():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop),
        )
    answer: str = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer


def run_export_check(
    reference: Loader,
    exports: Mapping[str, Loader],
    *,
    prompts: Sequence[str] = PROBES,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Answer every prompt with the reference and each export; say per prompt whether each export agrees.

    The result is plain JSON: prompts, every model's answers, per-export agreement and `all_agree`.
    """
    total, done = len(prompts) * (1 + len(exports)), 0
    answers: dict[str, list[str]] = {}
    for label, load in [("reference", reference), *exports.items()]:
        model, tokenizer = load()
        answers[label] = []
        for prompt in prompts:
            answers[label].append(greedy_answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens))
            done += 1
            if progress is not None:
                progress(done, total)
        del model
    agree = {label: [a == r for a, r in zip(answers[label], answers["reference"], strict=True)] for label in exports}
    return {
        "prompts": list(prompts),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "answers": answers,
        "agree": agree,
        "all_agree": all(all(flags) for flags in agree.values()),
    }
