"""The dataset formats the console accepts: how each example is checked and turned into chat.

Whatever comes in, one shape goes out, the one the training engine reads:
{"messages": [...], "tools": [...]} for chat-like data, and preference pairs
kept as {"input", "preferred_output", "non_preferred_output"}. A check collects
every problem of an example instead of stopping at the first, so an upload can
be fixed in one go. Plain Python (no Django), so a worker can use it as is.
"""

import json
import re
from dataclasses import asdict, dataclass, field, replace

from datasets_app.images import ImageInfo, check_image_url

# "developer" is OpenAI's newer name for system instructions; the chat format writes it as system.
ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_FORMATS = ("chat", "function_calling", "image")
CONVERTED_FORMATS = ("prompt_completion", "alpaca", "sharegpt")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MESSAGE_EXAMPLE = '{"role": "user", "content": "..."}'
_CALL_EXAMPLE = '{"id": "call_1", "type": "function", "function": {"name": "...", "arguments": "{...}"}}'
_TOOL_EXAMPLE = '{"type": "function", "function": {"name": "...", "parameters": {"type": "object", ...}}}'


@dataclass(frozen=True)
class Issue:
    """One problem in a dataset: line is 1-based, or None when it concerns the whole file."""

    line: int | None
    path: str
    code: str
    message: str

    def __str__(self) -> str:
        parts = [f"line {self.line}"] if self.line is not None else []
        if self.path:
            parts.append(self.path)
        return ": ".join([*parts, self.message])

    def to_dict(self) -> dict:
        return asdict(self)


class InvalidExample(ValueError):
    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass
class CheckedExample:
    """What checking one decoded line found, with the normalized example when it has no errors."""

    format: str
    """chat, function_calling, image, preference, prompt_completion, alpaca, sharegpt or unknown."""
    example: dict | None = None
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    messages: int = 0
    tool_calls: int = 0
    images: list[ImageInfo | None] = field(default_factory=list)
    """One entry per image part: the inline image's info, or None for a web address."""
    has_system: bool = False

    def error(self, path: str, code: str, message: str) -> None:
        self.errors.append(Issue(None, path, code, message))

    def warn(self, path: str, code: str, message: str) -> None:
        self.warnings.append(Issue(None, path, code, message))


def detect_format(obj: dict) -> str | None:
    """Name the format an object is written in from its keys, or None."""
    if "messages" in obj:
        return "chat"
    if "input" in obj and ("preferred_output" in obj or "non_preferred_output" in obj):
        return "preference"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or ("input" in obj and "output" in obj):
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return None


def check_example(obj: dict) -> CheckedExample:
    """Check one decoded JSON object and, when it has no errors, convert it to the normalized shape."""
    source = detect_format(obj)
    if source is None:
        checked = CheckedExample("unknown")
        keys = ", ".join(sorted(obj)[:8]) or "none"
        checked.error(
            "",
            "unknown_format",
            f'no known format (keys: {keys}); expected "messages", or prompt/completion, '
            "instruction/output (alpaca), conversations (sharegpt), or input/preferred_output/non_preferred_output",
        )
        return checked
    checked = CheckedExample(source)
    _CHECKERS[source](checked, obj)
    if checked.errors:
        checked.example = None
    return checked


def normalize_example(obj: dict) -> tuple[dict, str]:
    """Return the example in the normalized shape and the format it came in.

    Raises InvalidExample, holding the issues, when the example has errors.
    """
    checked = check_example(obj)
    if checked.errors:
        raise InvalidExample(checked.errors)
    return checked.example, checked.format


def describe(value) -> str:
    """Show a JSON value in a message, shortened."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


# --- chat, function calling and images ---------------------------------------


def _check_chat(checked: CheckedExample, obj: dict) -> None:
    tools = obj.get("tools")
    tool_names = _check_tools(checked, tools) if tools is not None else None
    messages = obj["messages"]
    if not _check_message_list(checked, messages, "messages"):
        return
    roles = _check_conversation(checked, messages, "messages", tool_names)
    if tools is not None or checked.tool_calls or "tool" in roles:
        checked.format = "function_calling"
    elif checked.images:
        checked.format = "image"
    checked.example = {"messages": messages, **({"tools": tools} if tools is not None else {})}


def _check_message_list(checked: CheckedExample, value, path: str) -> bool:
    if not isinstance(value, list):
        checked.error(path, "wrong_type", f"expected a list of messages, got {type_name(value)}")
        return False
    if not value:
        checked.error(path, "empty_messages", "is empty; expected at least a user and an assistant message")
        return False
    return True


def _check_conversation(
    checked: CheckedExample,
    messages: list,
    where: str,
    tool_names: set[str] | None,
    *,
    roles: tuple[str, ...] = ROLES,
    call_ids: set[str] | None = None,
    complete: bool = True,
) -> set[str]:
    """Check each message, then the conversation as a whole when it should be a complete example."""
    call_ids = set() if call_ids is None else call_ids
    seen = set()
    assistants = trained = unknown_roles = 0
    for i, message in enumerate(messages):
        role = _check_message(checked, message, f"{where}[{i}]", roles, call_ids, tool_names)
        if role is None:
            unknown_roles += 1
        seen.add(role)
        if role == "assistant":
            assistants += 1
            trained += message.get("weight", 1) != 0
    checked.messages += len(messages)
    checked.has_system = checked.has_system or "system" in seen or "developer" in seen
    if not complete:
        return seen
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if not assistants:
        if not unknown_roles:
            checked.error(
                where,
                "no_assistant_message",
                "has no assistant message, so there is nothing to learn; add the reply the model should give",
            )
    elif not trained:
        checked.warn(
            where,
            "no_trained_tokens",
            "every assistant message has weight 0, so this example teaches nothing",
        )
    elif last != "assistant" and last in ROLES:
        checked.warn(
            f"{where}[{len(messages) - 1}]",
            "not_ending_with_assistant",
            f"the conversation ends with a {last} message, which is not learned from; "
            "end it with the assistant's reply",
        )
    return seen


def _check_message(checked, message, path, roles, call_ids, tool_names) -> str | None:
    if not isinstance(message, dict):
        checked.error(
            path,
            "wrong_type",
            f"expected a message object like {_MESSAGE_EXAMPLE}, got {type_name(message)}",
        )
        return None
    role = message.get("role")
    if role is None:
        checked.error(f"{path}.role", "missing_field", f"is missing; expected one of {', '.join(roles)}")
        return None
    if not isinstance(role, str) or role not in roles:
        checked.error(f"{path}.role", "bad_role", f"{describe(role)} is not one of {', '.join(roles)}")
        return None
    calls = message.get("tool_calls")
    if calls is not None:
        if role == "assistant":
            _check_tool_calls(checked, calls, f"{path}.tool_calls", call_ids, tool_names)
        else:
            checked.error(
                f"{path}.tool_calls",
                "bad_tool_calls",
                f"only assistant messages can call tools, not {role} messages",
            )
    _check_content(checked, message, path, role, calls is not None)
    if role == "tool":
        _check_tool_reply(checked, message.get("tool_call_id"), f"{path}.tool_call_id", call_ids)
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            checked.error(f"{path}.weight", "bad_weight", f"only assistant messages take a weight, not {role} messages")
        elif type(weight) is not int or weight not in (0, 1):
            checked.error(
                f"{path}.weight",
                "bad_weight",
                f"{describe(weight)} is not 0 or 1 (0 skips this reply in training)",
            )
    return role


def _check_content(checked, message, path, role, has_calls) -> None:
    content = message.get("content")
    path = f"{path}.content"
    if content is None:
        if not (role == "assistant" and has_calls):
            what = "content or tool_calls" if role == "assistant" else "content"
            article = "an" if role == "assistant" else "a"
            checked.error(path, "missing_content", f"is missing; {article} {role} message needs {what}")
        return
    if isinstance(content, str):
        if role == "assistant" and not has_calls and not content.strip():
            checked.warn(
                path,
                "empty_assistant_content",
                "the assistant reply is empty, so the model learns to say nothing",
            )
        return
    if isinstance(content, list) and role in ("user", "assistant"):
        _check_parts(checked, content, path, role)
        return
    expected = "a string or a list of text and image_url parts" if role in ("user", "assistant") else "a string"
    checked.error(path, "bad_content", f"expected {expected}, got {type_name(content)}")


def _check_parts(checked, parts, path, role) -> None:
    if not parts:
        checked.error(path, "bad_content", "is an empty list; expected text and image_url parts")
        return
    image_parts = 0
    for j, part in enumerate(parts):
        part_path = f"{path}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                checked.error(
                    f"{part_path}.text",
                    "bad_content",
                    f"expected a string, got {type_name(part.get('text'))}",
                )
        elif kind == "image_url":
            image_parts += 1
            _check_image_part(checked, part.get("image_url"), f"{part_path}.image_url")
        elif isinstance(part, dict):
            checked.error(f"{part_path}.type", "bad_content", f"{describe(kind)} is not one of text, image_url")
        else:
            checked.error(
                part_path,
                "bad_content",
                f'expected a part like {{"type": "text", "text": "..."}}, got {type_name(part)}',
            )
    if role == "assistant" and image_parts and len(parts) != 1:
        checked.error(
            path,
            "bad_content",
            "an assistant image reply (text-to-image) must be a list with exactly one image_url part",
        )


def _check_image_part(checked, image, path) -> None:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        checked.error(path, "bad_image", 'expected {"url": "https://..."} or {"url": "data:image/jpeg;base64,..."}')
        return
    try:
        checked.images.append(check_image_url(url))
    except ValueError as problem:
        checked.error(f"{path}.url", "bad_image", str(problem))


def _check_tool_calls(checked, calls, path, call_ids, tool_names) -> None:
    if not isinstance(calls, list) or not calls:
        checked.error(
            path,
            "bad_tool_calls",
            f"expected a non-empty list of calls like {_CALL_EXAMPLE}, got {describe(calls)}",
        )
        return
    in_this_message: set[str] = set()
    for k, call in enumerate(calls):
        call_path = f"{path}[{k}]"
        if not isinstance(call, dict):
            checked.error(call_path, "bad_tool_calls", f"expected a call like {_CALL_EXAMPLE}, got {type_name(call)}")
            continue
        checked.tool_calls += 1
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id in in_this_message:
            checked.error(
                f"{call_path}.id",
                "bad_tool_calls",
                f"{describe(call_id)} is already the id of an earlier call in this message; each call needs its own id",
            )
        elif isinstance(call_id, str) and call_id:
            call_ids.add(call_id)
            in_this_message.add(call_id)
        else:
            checked.error(
                f"{call_path}.id",
                "bad_tool_calls",
                f"expected a non-empty string for the tool message to refer to, got {describe(call_id)}",
            )
        if call.get("type") != "function":
            checked.error(
                f"{call_path}.type",
                "bad_tool_calls",
                f'expected "function", got {describe(call.get("type"))}',
            )
        function = call.get("function")
        if not isinstance(function, dict):
            checked.error(
                f"{call_path}.function",
                "bad_tool_calls",
                f'expected {{"name": "...", "arguments": "{{...}}"}}, got {type_name(function)}',
            )
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name:
            checked.error(
                f"{call_path}.function.name",
                "bad_tool_calls",
                f"expected the name of a tool, got {describe(name)}",
            )
        elif tool_names is not None and name not in tool_names:
            checked.warn(
                f"{call_path}.function.name",
                "undeclared_tool",
                f'"{name}" is not among the tools declared in "tools"',
            )
        _check_arguments(checked, function.get("arguments"), f"{call_path}.function.arguments")


def _check_arguments(checked, arguments, path) -> None:
    if not isinstance(arguments, str):
        hint = ": encode the object with json.dumps" if isinstance(arguments, dict) else ""
        checked.error(
            path,
            "bad_arguments",
            f'expected a JSON string such as "{{\\"city\\": \\"Paris\\"}}", got {type_name(arguments)}{hint}',
        )
        return
    try:
        parsed = json.loads(arguments)
    except ValueError as problem:
        checked.error(
            path,
            "bad_arguments",
            f"is not valid JSON ({problem.msg} at character {problem.pos + 1}); expected a JSON object",
        )
        return
    if not isinstance(parsed, dict):
        checked.error(path, "bad_arguments", f"expected a JSON object of arguments, got {type_name(parsed)}")


def _check_tool_reply(checked, call_id, path, call_ids) -> None:
    if call_id is None:
        checked.error(path, "missing_field", "is missing; a tool message must give the id of the tool call it answers")
    elif not isinstance(call_id, str) or call_id not in call_ids:
        known = ", ".join(sorted(call_ids)[:5]) if call_ids else "none, no assistant message before it calls a tool"
        checked.error(path, "unknown_tool_call_id", f"{describe(call_id)} matches no earlier tool call (ids: {known})")


def _check_tools(checked, tools, path: str = "tools") -> set[str] | None:
    if not isinstance(tools, list):
        checked.error(path, "bad_tools", f"expected a list of tools like {_TOOL_EXAMPLE}, got {type_name(tools)}")
        return None
    names = set()
    for k, tool in enumerate(tools):
        tool_path = f"{path}[{k}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            checked.error(tool_path, "bad_tools", f"expected a tool like {_TOOL_EXAMPLE}")
            continue
        if tool.get("type") != "function":
            checked.error(f"{tool_path}.type", "bad_tools", f'expected "function", got {describe(tool.get("type"))}')
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            checked.error(
                f"{tool_path}.function.name",
                "bad_tools",
                f"{describe(name)} is not a tool name: expected 1-64 letters, digits, _ or -",
            )
        elif name in names:
            checked.error(f"{tool_path}.function.name", "bad_tools", f'"{name}" is declared twice')
        else:
            names.add(name)
        if not isinstance(function.get("description", ""), str):
            checked.error(
                f"{tool_path}.function.description",
                "bad_tools",
                f"expected a string, got {type_name(function['description'])}",
            )
        if "parameters" in function:
            _check_parameters(checked, function["parameters"], f"{tool_path}.function.parameters")
    return names


def _check_parameters(checked, schema, path) -> None:
    if not isinstance(schema, dict):
        checked.error(
            path,
            "bad_tools",
            'expected a JSON Schema object such as {"type": "object", "properties": {...}}, '
            f"got {type_name(schema)}",
        )
    elif schema.get("type", "object") != "object":
        checked.error(
            f"{path}.type",
            "bad_tools",
            f'the arguments schema must describe an object ("type": "object"), got {describe(schema["type"])}',
        )
    elif not isinstance(schema.get("properties", {}), dict):
        checked.error(
            f"{path}.properties",
            "bad_tools",
            f"expected an object mapping argument names to schemas, got {type_name(schema['properties'])}",
        )


# --- preference pairs ---------------------------------------------------------

ANSWER_KEYS = ("preferred_output", "non_preferred_output")
_DROP_EMPTY = (
    "DPO compares the two answers of a pair, so each needs text or tool calls: write the answer, or drop the pair"
)


def _check_preference(checked: CheckedExample, obj: dict) -> None:
    tools = obj.get("tools")
    tool_names = _check_tools(checked, tools) if tools is not None else None
    prompt = obj.get("input")
    call_ids: set[str] = set()
    if not isinstance(prompt, dict) or "messages" not in prompt:
        checked.error("input", "wrong_type", f'expected an object like {{"messages": [...]}}, got {type_name(prompt)}')
    elif _check_message_list(checked, prompt["messages"], "input.messages"):
        messages = _without_weights(checked, prompt["messages"], "input.messages", in_answer=False)
        _check_conversation(checked, messages, "input.messages", tool_names, call_ids=call_ids, complete=False)
        _check_prompt_end(checked, messages)
        prompt = {**prompt, "messages": messages}
    answers = {}
    for key in ANSWER_KEYS:
        if key not in obj:
            checked.error(key, "missing_field", "is missing; expected a list of assistant messages")
        elif obj[key] == []:
            checked.error(key, "empty_answer", f"is an empty list; {_DROP_EMPTY}")
        elif _check_message_list(checked, obj[key], key):
            answers[key] = _without_weights(checked, obj[key], key, in_answer=True)
            _check_answer(checked, answers[key], key, tool_names, set(call_ids))
    if not checked.errors and _answer_key(answers["preferred_output"]) == _answer_key(answers["non_preferred_output"]):
        checked.warn(
            "non_preferred_output",
            "identical_answers",
            "is the same answer as preferred_output, so this pair teaches no preference (DPO learns from the "
            "difference between the two); write a worse answer here, or drop the pair",
        )
    checked.example = {"input": prompt, **answers, **({"tools": tools} if tools is not None else {})}


def _without_weights(checked: CheckedExample, messages: list, where: str, *, in_answer: bool) -> list:
    """The messages without their weights: DPO trains every token of both answers and none of the input."""
    if not any(isinstance(message, dict) and "weight" in message for message in messages):
        return messages
    kept = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "weight" in message:
            weight = message["weight"]
            path = f"{where}[{i}].weight"
            if not in_answer:
                checked.warn(
                    path, "weight_ignored", "is ignored: the input of a preference pair is never trained; remove it"
                )
            elif type(weight) is int and weight == 1:
                checked.warn(path, "weight_ignored", "is ignored: DPO trains every token of both answers; remove it")
            else:
                checked.error(
                    path,
                    "bad_weight",
                    f"is {describe(weight)}, but DPO trains every token of both answers, so an answer cannot be "
                    "weighted; remove the weight (to leave the pair out of training, drop the pair)",
                )
            message = {key: value for key, value in message.items() if key != "weight"}
        kept.append(message)
    return kept


def _check_prompt_end(checked: CheckedExample, messages: list) -> None:
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last in ("user", "tool") or last not in ROLES:
        return
    if last == "assistant":
        problem = (
            "the input ends with an assistant message, but both answers are the assistant's reply to the user "
            "(or tool) message before them; end input.messages with that message (was an answer copied into the input?)"
        )
    else:
        problem = (
            f"the input ends with a {last} message, but both answers are the assistant's reply to a user "
            "(or tool) message; end input.messages with the user message the answers reply to"
        )
    checked.error(f"input.messages[{len(messages) - 1}]", "bad_prompt_end", problem)


def _check_answer(checked: CheckedExample, answer: list, key: str, tool_names, call_ids: set[str]) -> None:
    warnings_before = len(checked.warnings)
    _check_conversation(checked, answer, key, tool_names, roles=("assistant",), call_ids=call_ids, complete=False)
    empty = [f"{key}[{i}].content" for i, message in enumerate(answer) if _is_empty_reply(message)]
    for path in empty:
        checked.error(path, "empty_answer", f"the answer is empty; {_DROP_EMPTY}")
    # Chat data only warns about an empty reply; in a pair it is the error above.
    checked.warnings[warnings_before:] = [
        issue for issue in checked.warnings[warnings_before:] if issue.path not in empty
    ]


def _is_empty_reply(message) -> bool:
    """An assistant message whose content is there but says nothing (a missing one is its own error)."""
    if not isinstance(message, dict) or message.get("role") != "assistant" or message.get("tool_calls"):
        return False
    content = message.get("content")
    if not isinstance(content, (str, list)) or content == []:
        return False  # missing, empty list or not text: errors of their own
    return _content_key(content) == ("", ())


def _answer_key(answer: list) -> list:
    """What tells two answers apart: roles, texts and tool calls; not whitespace at the ends, not call ids."""
    return [
        (
            message["role"],
            _content_key(message.get("content")),
            [_call_key(call) for call in message.get("tool_calls") or []],
        )
        for message in answer
    ]


def _content_key(content) -> tuple[str, tuple]:
    """The text of a content, stripped, and its image addresses."""
    if isinstance(content, str):
        return content.strip(), ()
    if not isinstance(content, list):
        return "", ()
    parts = [part for part in content if isinstance(part, dict)]
    text = "".join(part["text"] for part in parts if part.get("type") == "text" and isinstance(part.get("text"), str))
    images = tuple(
        json.dumps(part.get("image_url"), sort_keys=True) for part in parts if part.get("type") == "image_url"
    )
    return text.strip(), images


def _call_key(call: dict) -> tuple:
    function = call["function"]
    return function["name"], json.loads(function["arguments"])


# --- formats converted to chat ------------------------------------------------


def _check_prompt_completion(checked: CheckedExample, obj: dict) -> None:
    needs = "a prompt/completion example needs both as strings"
    prompt = _required_string(checked, obj, "prompt", needs)
    completion = _required_string(checked, obj, "completion", needs)
    if prompt is None or completion is None:
        return
    if not completion.strip():
        checked.warn(
            "completion",
            "empty_assistant_content",
            "the completion is empty, so the model learns to say nothing",
        )
    checked.messages = 2
    checked.example = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def _check_alpaca(checked: CheckedExample, obj: dict) -> None:
    needs = "an alpaca example needs instruction and output (input and system are optional)"
    instruction = _required_string(checked, obj, "instruction", needs)
    output = _required_string(checked, obj, "output", needs)
    extra = _optional_string(checked, obj, "input")
    system = _optional_string(checked, obj, "system")
    if instruction is None or output is None or checked.errors:
        return
    if not output.strip():
        checked.warn("output", "empty_assistant_content", "the output is empty, so the model learns to say nothing")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": output})
    checked.messages = len(messages)
    checked.has_system = bool(system)
    checked.example = {"messages": messages}


def _check_sharegpt(checked: CheckedExample, obj: dict) -> None:
    turns = obj["conversations"]
    tools = obj.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory writes the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except ValueError:
            checked.error("tools", "bad_tools", "is a string but not valid JSON; expected a list of tools")
            tools = None
    tool_names = _check_tools(checked, tools) if tools is not None else None
    system = _optional_string(checked, obj, "system")
    if not _check_message_list(checked, turns, "conversations"):
        return
    messages = _sharegpt_messages(checked, turns)
    if checked.errors:
        return
    errors_before, warnings_before = len(checked.errors), len(checked.warnings)
    _check_conversation(checked, messages, "conversations", tool_names)
    # The chat checks name chat fields; point them back at the fields of the file.
    for issues, start in ((checked.errors, errors_before), (checked.warnings, warnings_before)):
        for n in range(start, len(issues)):
            issues[n] = replace(issues[n], path=issues[n].path.replace(".content", ".value"))
    if system:
        messages.insert(0, {"role": "system", "content": system})
        checked.messages += 1
        checked.has_system = True
    checked.example = {"messages": messages, **({"tools": tools} if tools is not None else {})}


def _sharegpt_messages(checked: CheckedExample, turns: list) -> list[dict]:
    messages = []
    pending_ids: list[str] = []
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        if not isinstance(turn, dict):
            checked.error(
                path,
                "wrong_type",
                f'expected a turn like {{"from": "human", "value": "..."}}, got {type_name(turn)}',
            )
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            checked.error(f"{path}.from", "bad_role", f"{describe(speaker)} is not one of {', '.join(SHAREGPT_ROLES)}")
            continue
        if value is None:
            checked.error(f"{path}.value", "missing_content", f"is missing; a {speaker} turn needs a value")
            continue
        if not isinstance(value, str):
            checked.error(f"{path}.value", "bad_content", f"expected a string, got {type_name(value)}")
            continue
        if speaker == "function_call":
            calls = _sharegpt_calls(checked, value, f"{path}.value", i)
            pending_ids = [call["id"] for call in calls]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        elif speaker == "observation":
            if not pending_ids:
                checked.error(path, "unknown_tool_call_id", "an observation turn must follow a function_call turn")
                continue
            messages.append({"role": "tool", "tool_call_id": pending_ids.pop(0), "content": value})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _sharegpt_calls(checked: CheckedExample, value: str, path: str, turn: int) -> list[dict]:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(call, dict) and isinstance(call.get("name"), str) for call in calls):
        checked.error(
            path,
            "bad_tool_calls",
            'a function_call turn must hold JSON such as {"name": "...", "arguments": {...}}',
        )
        return []
    converted = []
    for k, call in enumerate(calls):
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        function = {"name": call["name"], "arguments": arguments}
        converted.append({"id": f"call_{turn}_{k}", "type": "function", "function": function})
    return converted


def _required_string(checked: CheckedExample, obj: dict, key: str, needs: str) -> str | None:
    value = obj.get(key)
    if value is None:
        checked.error(key, "missing_field", f"is missing; {needs}")
        return None
    if not isinstance(value, str):
        checked.error(key, "wrong_type", f"expected a string, got {type_name(value)}")
        return None
    return value


def _optional_string(checked: CheckedExample, obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        checked.error(key, "wrong_type", f"expected a string, got {type_name(value)}")
        return ""
    return value


_CHECKERS = {
    "chat": _check_chat,
    "preference": _check_preference,
    "prompt_completion": _check_prompt_completion,
    "alpaca": _check_alpaca,
    "sharegpt": _check_sharegpt,
}
