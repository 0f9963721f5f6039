"""Checking chat messages and tools, and rendering them through the model's chat template."""

import json

from jinja2 import TemplateError

from .errors import InvalidRequest, ServingError
from .tools import describe_tools, tool_calls_as_text

ROLES = ("system", "developer", "user", "assistant", "tool")
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe_tool_7f3a", "description": "probe", "parameters": {"type": "object"}},
}


def check_messages(messages) -> list[str]:
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
        elif content is not None and _text_of(content) is None:
            problems.append(f"{where}.content must be a string or a list of text parts")
        if message.get("tool_calls") is not None and not _tool_calls_valid(message["tool_calls"]):
            problems.append(f"{where}.tool_calls must be a list of {{'function': {{'name', 'arguments'}}}}")
    return problems


def check_tools(tools) -> list[str]:
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


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None, *, template_has_tools: bool) -> list[int]:
    """Return the prompt token ids for messages (already checked), ending where the assistant answers."""
    messages = [_plain_message(message) for message in messages]
    if tools and not template_has_tools:
        messages = _with_tools_in_text(messages, tools)
        tools = None
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:  # a conversation the template refuses, e.g. roles out of order
        raise InvalidRequest([f"the model's chat template rejected the messages: {error}"]) from error
    except ValueError as error:  # no chat template at all
        raise ServingError(f"the model cannot chat: {error}") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_has_tools(tokenizer) -> bool:
    """Tell whether the chat template shows the tools it is given (many small models' templates do not)."""
    probe = [{"role": "user", "content": "hello"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception:
        return False
    return with_tools != without


def _plain_message(message: dict) -> dict:
    plain = {key: value for key, value in message.items() if key in ("role", "content", "tool_calls", "tool_call_id", "name")}
    plain["role"] = "system" if message["role"] == "developer" else message["role"]
    plain["content"] = _text_of(message.get("content")) or ""
    if plain.get("tool_calls"):
        plain["tool_calls"] = [_call_with_dict_arguments(call) for call in plain["tool_calls"]]
    else:
        plain.pop("tool_calls", None)
    return plain


def _call_with_dict_arguments(call: dict) -> dict:
    """OpenAI sends arguments as a JSON string; chat templates expect a dict (they write it with tojson)."""
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _with_tools_in_text(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Put the tools into the system message, and earlier calls into assistant text, for a template that ignores them."""
    rewritten = []
    for message in messages:
        if message.get("tool_calls"):
            calls = tool_calls_as_text(message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message["content"] else calls
            message = {"role": "assistant", "content": content}
        rewritten.append(message)
    description = describe_tools(tools)
    if rewritten[0]["role"] == "system":
        rewritten[0] = {**rewritten[0], "content": f"{rewritten[0]['content']}\n\n{description}".strip()}
    else:
        rewritten.insert(0, {"role": "system", "content": description})
    return rewritten


def _text_of(content) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(text, str) for text in texts):
            return "".join(texts)
    return None


def _tool_calls_valid(tool_calls) -> bool:
    return isinstance(tool_calls, list) and all(
        isinstance(call, dict) and isinstance(call.get("function"), dict) and call["function"].get("name")
        for call in tool_calls
    )
