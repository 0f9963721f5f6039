"""Grader templates: `{{item.a.b}}`, `{{sample.output_text}}` and `{{sample.output_tools}}`.

A placeholder is a dotted path. `item.*` walks the dataset item through dict keys and list
indexes (`{{item.messages.0.content}}`); `sample.*` reads the model's answer. Strings render
as they are, anything else as compact JSON, so a list of tool calls drops into a prompt whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm.evals.graders import Sample

PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")


class MissingField(KeyError):
    """A placeholder's path does not lead to a value in this example."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.path} is missing"


def referenced_fields(template: str) -> set[str]:
    """Return every placeholder path in the template, e.g. {"item.reference", "sample.output_text"}."""
    return {match.group(1) for match in PLACEHOLDER.finditer(template)}


def render(template: str, item: Mapping[str, Any], sample: Sample | None) -> str:
    """Fill the template's placeholders from the item and the sample; raise MissingField for a missing path."""
    return PLACEHOLDER.sub(lambda match: _as_text(resolve(match.group(1), item, sample)), template)


def resolve(path: str, item: Mapping[str, Any], sample: Sample | None) -> Any:
    """Return the value a placeholder path names, unrendered."""
    root, *segments = path.split(".")
    value: Any
    if root == "item":
        value = item
    elif root == "sample" and sample is not None and segments and segments[0] in ("output_text", "output_tools"):
        value = sample.output_text if segments[0] == "output_text" else sample.output_tools
        segments = segments[1:]
    else:
        raise MissingField(path)
    for segment in segments:
        value = _step(value, segment, path)
    return value


def _step(value: Any, segment: str, path: str) -> Any:
    if isinstance(value, Mapping):
        if segment in value:
            return value[segment]
    elif isinstance(value, list) and segment.isascii() and segment.isdigit():
        index = int(segment)
        if index < len(value):
            return value[index]
    raise MissingField(path)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
