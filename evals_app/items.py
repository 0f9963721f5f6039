"""A run's examples: read from its data source, and the messages each one sends the model.

Our fine-tuning files become items in one convention: `input` (the conversation up to the
last answer), `reference` (that answer's text), `reference_tool_calls` (its tool calls, if
any) and `tools`. OpenAI's eval files (`{"item": {...}}` per line) are read as they are.
"""

import json
from collections.abc import Iterator
from itertools import islice

from django.conf import settings

from datasets_app.models import Dataset
from datasets_app.selectors import dataset_for
from finetune_site.errors import InvalidInput, InvalidState, NotFound
from llm.evals.templates import MissingField, render
from llm.evals.text import tokens

CHAT_ITEM_FIELDS = {"input", "reference", "reference_tool_calls", "tools"}
"""The fields of an item made from a chat example: graders over such data may name only these."""

CHAT_ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "input": {"type": "array", "items": {"type": "object"}},
        "reference": {"type": "string"},
        "reference_tool_calls": {"type": "array", "items": {"type": "object"}},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["input", "reference"],
}


def item_of(record) -> dict | None:
    """The item for one line of a data file; None for a line that has none (a chat example with no answer)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("item"), dict):
        return record["item"]
    if isinstance(record.get("messages"), list):
        return _chat_item(record["messages"], record.get("tools"))
    if isinstance(record.get("input"), dict) and "preferred_output" in record:
        answer = record.get("preferred_output") or []
        reference = answer[-1].get("content") if answer and isinstance(answer[-1], dict) else None
        messages = record["input"].get("messages")
        if isinstance(messages, list) and isinstance(reference, str):
            return {"input": messages, "reference": reference}
        return None
    return record


def _chat_item(messages: list, tools) -> dict | None:
    last = max(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=None
    )
    if not last:
        return None
    answer = messages[last]
    # Every item has both references, so that on data mixing tool calls and text answers each grader
    # scores every row: a text answer expects no call, and a call expects no text.
    item = {"input": messages[:last], "reference": answer.get("content") or "", "reference_tool_calls": []}
    if not isinstance(item["reference"], str):
        return None
    if answer.get("tool_calls"):
        item["reference_tool_calls"] = answer["tool_calls"]
    if tools:
        item["tools"] = tools
    return item


def source_dataset(user, source: dict) -> Dataset:
    """The user's processed file a `{"type": "file_id", "id": ...}` source names."""
    dataset = dataset_for(user, source.get("id") or "")
    if dataset is None:
        raise NotFound(f"No file with id {source.get('id')!r} was found.", param="data_source.source.id")
    if dataset.status != Dataset.PROCESSED:
        raise InvalidState(
            f"The file {dataset.public_id} is {dataset.status}, not processed: it can be evaluated once it is.",
            param="data_source.source.id",
        )
    return dataset


def read_items(user, data_source: dict, *, limit: int | None = None) -> list[dict]:
    """Every item of the source, in order; a source larger than FT_EVAL_MAX_ITEMS is refused."""
    cap = settings.FT_EVAL_MAX_ITEMS
    source = data_source.get("source") or {}
    if source.get("type") == "file_content":
        records: Iterator = iter(entry.get("item") if isinstance(entry, dict) else None for entry in source["content"])
        items = [item for item in records if isinstance(item, dict)]
    else:
        # Read no further than needed, plus one line to tell a file past the cap.
        items = list(islice(_file_items(source_dataset(user, source)), (limit or cap) + 1))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise InvalidInput("The data source holds no example with an answer to grade.", param="data_source.source")
    if len(items) > cap:
        raise InvalidInput(
            f"The data source holds {len(items)} examples; one run takes at most {cap} (FT_EVAL_MAX_ITEMS).",
            param="data_source.source",
        )
    return items


def _file_items(dataset: Dataset) -> Iterator[dict]:
    source = dataset.normalized if dataset.normalized else dataset.file
    with source.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                item = item_of(json.loads(line))
            except ValueError:
                continue  # a processed file has none; a line that is not JSON has no item to grade
            if item is not None:
                yield item


def messages_for(item: dict, input_messages: dict | None) -> list[dict]:
    """The conversation sent to the model for one item; MissingField or ValueError when the item lacks it."""
    spec = input_messages or {"type": "item_reference", "item_reference": "item.input"}
    if spec.get("type") == "item_reference":
        value = _path(item, spec.get("item_reference") or "item.input")
        if not isinstance(value, list) or not value:
            raise ValueError(f"{spec.get('item_reference')} is not a list of messages")
        return value
    messages = []
    for message in spec.get("template") or []:
        content = message.get("content")
        if isinstance(content, dict) and content.get("type") in ("input_text", "output_text"):
            content = content.get("text") or ""
        messages.append({"role": message.get("role") or "user", "content": render(str(content), item, None)})
    return messages


def _path(item: dict, reference: str):
    parts = reference.split(".")
    if parts[0] != "item":
        raise ValueError(f"item_reference must start with 'item.', got {reference!r}")
    value = item
    for part in parts[1:]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingField(reference)
    return value


def answer_budget(examples: list[dict]) -> int:
    """Tokens an answer may take when nobody said: 32 plus three per word of the longest reference
    (a word is one to three tokens), within FT_EVAL_MAX_TOKENS.

    A base model asked a short-answer question often goes on for hundreds of tokens; an answer
    far longer than every reference is graded wrong anyway, and cutting it keeps an evaluation of
    several models (a job's automatic one, one made on the page) to minutes on a CPU.
    """
    longest = max((len(tokens(str(item.get("reference") or ""))) for item in examples), default=0)
    return min(settings.FT_EVAL_MAX_TOKENS, 32 + 3 * longest)
