"""Tool calling: describing tools to a model whose template ignores them, and parsing calls back."""

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# An unclosed block runs to the end of the text: small models often stop right after the JSON.
_TAGGED_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)
_CODE_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated text into its content and OpenAI-shaped tool calls.

    Understands `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
    (Qwen/Hermes style) and, failing those, a reply that is nothing but such a JSON
    object (or a list of them), optionally in a code fence. Markup that does not
    parse stays in the content untouched.
    """
    calls: list[dict[str, Any]] = []
    pieces: list[str] = []
    position = 0
    for match in _TAGGED_CALL.finditer(text):
        found = _calls_from_json(match.group(1), require_arguments=False)
        if found is None:
            continue
        calls.extend(found)
        pieces.append(text[position : match.start()])
        position = match.end()
    if calls:
        pieces.append(text[position:])
        return "".join(pieces).strip(), calls

    stripped = text.strip()
    fenced = _CODE_FENCE.match(stripped)
    found = _calls_from_json(fenced.group(1) if fenced else stripped, require_arguments=True)
    if found:
        return "", found
    return text, []


def _calls_from_json(source: str, *, require_arguments: bool) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(source.strip())
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_tool_call(item, require_arguments=require_arguments) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _tool_call(item: object, *, require_arguments: bool) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    # Either already OpenAI-shaped ({"function": {...}}) or the function itself.
    function: dict[Any, Any] = item["function"] if isinstance(item.get("function"), dict) else item
    name = function.get("name")
    if not isinstance(name, str) or not name:
        return None
    if "arguments" in function:
        arguments = function["arguments"]
    elif "parameters" in function:
        arguments = function["parameters"]
    elif require_arguments:
        # A bare {"name": ...} is as likely an answer as a call.
        return None
    else:
        arguments = {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """Return a system-prompt paragraph telling the model which tools it has and how to call them."""
    lines = [
        "You can call the following tools. To call one, reply with only",
        TOOL_CALL_OPEN + '{"name": "<tool name>", "arguments": {<arguments as JSON>}}' + TOOL_CALL_CLOSE,
        "",
        "Tools:",
    ]
    for tool in tools:
        function = tool.get("function", tool)
        line = f"- {function['name']}"
        if function.get("description"):
            line += f": {function['description']}"
        if function.get("parameters"):
            line += f"\n  arguments (JSON schema): {json.dumps(function['parameters'], ensure_ascii=False)}"
        lines.append(line)
    return "\n".join(lines)


def tool_calls_as_text(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """Write earlier assistant tool calls as the markup the model was told to use."""
    blocks = []
    for call in tool_calls:
        function = call.get("function", call)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        blocks.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
    return "\n".join(blocks)


def tool_call_schema(tools: Sequence[Mapping[str, Any]], *, name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call's body inside the markup: {"name": <a tool>, "arguments": <its parameters>}.

    With `name`, only that tool may be called. Grammar-constrained decoding (llm.serve.constraints)
    uses it to make a forced tool call parse exactly as `parse_tool_calls` reads it.
    """
    choices = []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return choices[0] if len(choices) == 1 else {"anyOf": choices}
