"""Batch compare: every model answers the same validation examples, each answer scored against the reference."""

import asyncio
import json

from finetune_site.errors import ApplicationError
from llm.serve.schema import Completion

from ..chat.serving import open_events
from . import metrics

MAX_BATCH = 50
MAX_MODELS = 3
"""As many as the playground has panes: each model answers every example, one after another."""


async def batch_rows(user, models, examples, settings_, system):
    """One JSON line per example with each model's answer and scores, then one with the totals."""
    totals = {m: {"exact_match": 0, "rouge_l": 0.0, "errors": 0} for m in models}
    yield json.dumps({"type": "start", "rows": len(examples), "models": models}) + "\n"
    for index, example in enumerate(examples):
        messages = example["messages"]
        if system:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        answers = {}
        for model in models:
            text, failure = await _answer(user, {**settings_, "model": model, "messages": messages})
            # Scoring is pure Python and grows with both texts: in a thread, never on the event loop.
            exact, score = (
                await asyncio.to_thread(_score, text, example["reference"]) if failure is None else (False, 0.0)
            )
            totals[model]["exact_match"] += int(exact)
            totals[model]["rouge_l"] += score
            totals[model]["errors"] += int(failure is not None)
            answers[model] = {"text": text, "error": failure, "exact_match": exact, "rouge_l": round(score, 4)}
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        yield (
            json.dumps(
                {"type": "row", "index": index, "prompt": prompt, "reference": example["reference"], "answers": answers}
            )
            + "\n"
        )
    count = max(len(examples), 1)
    summary = {
        m: {"exact_match": t["exact_match"] / count, "rouge_l": round(t["rouge_l"] / count, 4), "errors": t["errors"]}
        for m, t in totals.items()
    }
    yield json.dumps({"type": "total", "rows": len(examples), "models": summary}) + "\n"


def _score(answer: str, reference: str) -> tuple[bool, float]:
    return metrics.exact_match(answer, reference), metrics.rouge_l(answer, reference)


async def _answer(user, params) -> tuple[str, str | None]:
    try:
        events = await open_events(user, params)
        async for event in events:
            if isinstance(event, Completion):
                return event.content, None
    except ApplicationError as exc:
        return "", exc.message
    except Exception as exc:  # noqa: BLE001 - one failed row must not end the batch
        return "", f"{type(exc).__name__}: {exc}"
    return "", "the model returned no answer"
