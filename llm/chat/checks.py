"""Checking a conversation's shape before it is rendered: every problem named by where it is."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages: Any) -> list[str]:
    """Return every problem with a list of chat messages (empty when they are fine)."""
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list"]
    problems = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object with a role and content")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        may_be_empty = role == "assistant" and message.get("tool_calls")
        if content is None and not may_be_empty:
            problems.append(f"{where} has no content")
        elif content is not None and not _is_text(content):
            problems.append(f"{where}.content must be a string or a list of text parts")
        if message.get("tool_calls") is not None and not _tool_calls_valid(message["tool_calls"]):
            problems.append(f"{where}.tool_calls must be a list of {{'function': {{'name', 'arguments'}}}}")
    return problems


def check_tools(tools: Any) -> list[str]:
    """Return every problem with a list of tool definitions (empty when they are fine)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        return ["tools must be a list"]
    problems = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(f"tools[{index}] must look like {{'type': 'function', 'function': {{'name': ...}}}}")
        elif tool.get("type", "function") != "function":
            problems.append(f"tools[{index}].type must be 'function'")
    return problems


def _is_text(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    )


def _tool_calls_valid(tool_calls: Any) -> bool:
    return isinstance(tool_calls, list) and all(
        isinstance(call, dict) and isinstance(call.get("function"), dict) and bool(call["function"].get("name"))
        for call in tool_calls
    )
