"""Reads for the playground: validation examples to try a model on, and the exact prompt a model receives."""

import json
import random
from functools import lru_cache

from finetune_site.errors import InvalidInput, NotFound
from jobs_app.selectors import checkpoint_for_model_id
from llm.chat import check_messages, check_tools
from llm.serve.errors import InvalidRequest, ServingError
from llm.serve.prompt import render_prompt

from ..catalog import resolve_model
from ..models import ModelCard

_MAX_LINES_SCANNED = 5000


def _job_of(user, model_id: str):
    card = ModelCard.objects.owned_by(user).filter(model_id=model_id).select_related("job").first()
    if card is not None:
        return card.job
    checkpoint = checkpoint_for_model_id(user, model_id)
    return checkpoint.job if checkpoint else None


def validation_examples(user, model_id: str, *, n: int, seed: int | None = None) -> list[dict]:
    """Up to n examples from the model's validation data (training data when it has none).

    Each is {"messages": the conversation up to the last answer, "reference": that answer}.
    """
    job = _job_of(user, model_id)
    if job is None:
        raise InvalidInput(
            f"{model_id} has no training data to sample from: pick a fine-tuned model or checkpoint.", param="model"
        )
    dataset = job.validation_file or job.training_file
    source = dataset.normalized if dataset and dataset.normalized else (dataset.file if dataset else None)
    if not source:
        raise InvalidInput("The model's dataset is no longer available.", param="model")
    examples = []
    with source.open("rb") as lines:
        for number, line in enumerate(lines):
            if number >= _MAX_LINES_SCANNED:
                break
            example = _split(line)
            if example:
                examples.append(example)
    random.Random(seed).shuffle(examples)
    return examples[:n]


def _split(line: bytes) -> dict | None:
    try:
        example = json.loads(line)
        if "input" in example:  # a preference pair: its prompt, and the preferred answer as the reference
            return _pair_prompt(example)
        messages = example.get("messages") or []
    except (ValueError, AttributeError, TypeError):
        return None
    last = max(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=None
    )
    if not last or not isinstance(messages[last].get("content"), str):
        return None
    return {"messages": messages[:last], "reference": messages[last]["content"]}


def _pair_prompt(example: dict) -> dict | None:
    messages, answer = example["input"].get("messages") or [], example.get("preferred_output") or []
    reference = answer[-1].get("content") if answer and isinstance(answer[-1], dict) else None
    if not messages or not isinstance(reference, str):
        return None
    return {"messages": messages, "reference": reference}


@lru_cache(maxsize=8)
def _tokenizer(base_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)


def render_chat_template(user, model_id: str, messages: list, tools: list | None = None) -> dict:
    """The exact prompt text the model receives for these messages, and its token count."""
    resolved = resolve_model(user, model_id)
    if resolved is None:
        raise NotFound(f"The model {model_id!r} does not exist or you do not have access to it.", param="model")
    problems = check_messages(messages) + check_tools(tools)
    if problems:
        raise InvalidInput("; ".join(problems), param="messages")
    tokenizer = _tokenizer(str(resolved.base_path))
    try:
        ids = render_prompt(tokenizer, messages, tools)
    except (InvalidRequest, ServingError) as exc:
        raise InvalidInput(str(exc), param="messages") from exc
    return {"model": model_id, "prompt": tokenizer.decode(ids), "prompt_tokens": len(ids)}
