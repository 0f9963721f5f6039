"""Every kind of error validation reports, with its line, path and wording."""

import io

import pytest

from datasets_app import validation
from tests.datasets.support import (
    chat,
    data_url,
    function_calling_example,
    image_question,
    jsonl,
    line,
    only_error,
    png_bytes,
    validate,
    weather_call,
)

GOOD = chat("Hi", "Hello!")


def test_it_reports_bad_role_with_line_and_path():
    bad = chat("Hi", "Hello!")
    bad["messages"][2]["role"] = "bot"
    report, written = validate(jsonl(*[GOOD] * 16, bad))

    error = only_error(report)
    assert str(error) == 'line 17: messages[2].role: "bot" is not one of system, developer, user, assistant, tool'
    assert (error.line, error.path, error.code) == (17, "messages[2].role", "bad_role")
    assert report.ok is False
    assert report.examples == 16 and len(written) == 16


def test_it_reports_a_line_that_is_not_json():
    report, _ = validate(line(GOOD) + b"{'messages': []}\n")

    error = only_error(report)
    assert (error.line, error.code) == (2, "invalid_json")
    assert error.message.startswith("not valid JSON: Expecting property name enclosed in double quotes at column 2")


def test_it_reports_a_truncated_line():
    report, _ = validate(line(GOOD) + line(GOOD)[:40] + b"\n" + line(GOOD))

    assert str(only_error(report)) == (
        "line 2: the line ends before its JSON is complete (cut short?); expected one whole JSON object per line"
    )


def test_it_hints_at_pretty_printed_json():
    report, _ = validate(b'[\n  {"messages": []}\n]\n')

    assert str(report.errors[0]) == (
        "line 1: not valid JSON: the file looks like pretty-printed JSON, but each example must sit on one line (JSON Lines)"
    )


def test_it_reports_lines_that_are_not_objects():
    report, _ = validate(b'[{"messages": []}]\n42\n')

    assert [str(error) for error in report.errors] == [
        "line 1: is a JSON array; expected one JSON object per line (JSON Lines), not an array of examples",
        'line 2: is a number; expected a JSON object such as {"messages": [...]}',
    ]
    assert report.error_counts == {"not_an_object": 2}


def test_it_reports_an_object_in_no_known_format():
    report, _ = validate(line({"text": "hello", "label": 1}))

    error = only_error(report)
    assert error.code == "unknown_format"
    assert error.message.startswith('no known format (keys: label, text); expected "messages"')


def test_it_reports_missing_empty_or_wrong_typed_messages():
    report, _ = validate(jsonl({"messages": []}, {"messages": "Hi"}, {"messages": [GOOD["messages"][1], "Hello"]}))

    assert [str(error) for error in report.errors] == [
        "line 1: messages: is empty; expected at least a user and an assistant message",
        "line 2: messages: expected a list of messages, got a string",
        'line 3: messages[1]: expected a message object like {"role": "user", "content": "..."}, got a string',
    ]
    assert [error.code for error in report.errors] == ["empty_messages", "wrong_type", "wrong_type"]


def test_it_reports_a_missing_role():
    report, _ = validate(line({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}))

    assert (
        str(only_error(report))
        == "line 1: messages[0].role: is missing; expected one of system, developer, user, assistant, tool"
    )


def test_it_reports_missing_content():
    report, _ = validate(line({"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]}))

    error = only_error(report)
    assert (error.code, str(error)) == (
        "missing_content",
        "line 1: messages[0].content: is missing; a user message needs content",
    )


def test_it_reports_missing_assistant_content_without_tool_calls():
    report, _ = validate(
        line({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]})
    )

    assert (
        str(only_error(report))
        == "line 1: messages[1].content: is missing; an assistant message needs content or tool_calls"
    )


def test_it_reports_wrong_typed_content():
    example = {
        "messages": [
            {"role": "system", "content": ["x"]},
            {"role": "user", "content": 7},
            {"role": "assistant", "content": "ok"},
        ]
    }
    report, _ = validate(line(example))

    assert [str(error) for error in report.errors] == [
        "line 1: messages[0].content: expected a string, got an array",
        "line 1: messages[1].content: expected a string or a list of text and image_url parts, got a number",
    ]
    assert report.error_counts == {"bad_content": 2}


def test_it_reports_bad_content_parts():
    example = image_question("https://example.com/cat.png")
    example["messages"][0]["content"] += [{"type": "audio"}, {"type": "text", "text": 3}, "plain"]
    report, _ = validate(line(example))

    assert [str(error) for error in report.errors] == [
        'line 1: messages[0].content[2].type: "audio" is not one of text, image_url',
        "line 1: messages[0].content[3].text: expected a string, got a number",
        'line 1: messages[0].content[4]: expected a part like {"type": "text", "text": "..."}, got a string',
    ]


def test_it_reports_a_conversation_without_assistant_message():
    report, _ = validate(
        line({"messages": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}]})
    )

    error = only_error(report)
    assert (error.line, error.path, error.code) == (1, "messages", "no_assistant_message")
    assert "has no assistant message, so there is nothing to learn" in error.message


def test_it_does_not_add_no_assistant_when_a_role_is_misspelled():
    report, _ = validate(
        line({"messages": [{"role": "user", "content": "Hi"}, {"role": "Assistant", "content": "Yo"}]})
    )

    assert report.error_counts == {"bad_role": 1}


@pytest.mark.parametrize(
    ("tool_calls", "path", "message"),
    [
        ({"id": "call_1"}, "messages[2].tool_calls", "expected a non-empty list of calls like"),
        ([], "messages[2].tool_calls", "expected a non-empty list of calls like"),
        (["get_weather"], "messages[2].tool_calls[0]", "expected a call like"),
        (
            [{**weather_call(), "id": ""}],
            "messages[2].tool_calls[0].id",
            "expected a non-empty string for the tool message",
        ),
        ([{**weather_call(), "type": "tool"}], "messages[2].tool_calls[0].type", 'expected "function", got "tool"'),
        (
            [{"id": "call_1", "type": "function"}],
            "messages[2].tool_calls[0].function",
            'expected {"name": "...", "arguments": "{...}"}, got null',
        ),
        (
            [{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}],
            "messages[2].tool_calls[0].function.name",
            "expected the name of a tool, got null",
        ),
    ],
)
def test_it_reports_malformed_tool_calls(tool_calls, path, message):
    example = function_calling_example()
    example["messages"][2]["tool_calls"] = tool_calls
    example["messages"][3]["tool_call_id"] = "call_1"
    report, _ = validate(line(example))

    bad_calls = [error for error in report.errors if error.code == "bad_tool_calls"]
    assert len(bad_calls) == 1
    assert bad_calls[0].path == path
    assert bad_calls[0].message.startswith(message)


def test_it_reports_tool_calls_on_a_user_message():
    example = function_calling_example()
    example["messages"][1]["tool_calls"] = [weather_call("call_0")]
    report, _ = validate(line(example))

    assert (
        str(only_error(report))
        == "line 1: messages[1].tool_calls: only assistant messages can call tools, not user messages"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('{"city": "Paris"', "is not valid JSON (Expecting ',' delimiter at character 17); expected a JSON object"),
        ('["Paris"]', "expected a JSON object of arguments, got an array"),
        (
            {"city": "Paris"},
            'expected a JSON string such as "{\\"city\\": \\"Paris\\"}", got an object: encode the object with json.dumps',
        ),
    ],
)
def test_it_reports_arguments_that_are_not_a_json_object_string(arguments, message):
    example = function_calling_example()
    example["messages"][2]["tool_calls"] = [weather_call(arguments=arguments)]
    report, _ = validate(line(example))

    error = only_error(report)
    assert (error.path, error.code, error.message) == (
        "messages[2].tool_calls[0].function.arguments",
        "bad_arguments",
        message,
    )


def test_it_reports_a_tool_call_id_with_no_matching_call():
    example = function_calling_example()
    example["messages"][3]["tool_call_id"] = "call_9"
    report, _ = validate(line(example))

    assert (
        str(only_error(report))
        == 'line 1: messages[3].tool_call_id: "call_9" matches no earlier tool call (ids: call_1)'
    )
    assert report.error_counts == {"unknown_tool_call_id": 1}


def test_it_reports_a_tool_reply_before_any_call_or_without_id():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
        {"role": "tool", "content": "{}"},
        {"role": "assistant", "content": "Done"},
    ]
    report, _ = validate(line({"messages": messages}))

    assert [str(error) for error in report.errors] == [
        'line 1: messages[1].tool_call_id: "call_1" matches no earlier tool call (ids: none, no assistant message before it calls a tool)',
        "line 1: messages[2].tool_call_id: is missing; a tool message must give the id of the tool call it answers",
    ]


@pytest.mark.parametrize(
    ("tools", "path", "message"),
    [
        ({"get_weather": {}}, "tools", "expected a list of tools like"),
        (["get_weather"], "tools[0]", "expected a tool like"),
        (
            [{"type": "function", "function": {"name": "get weather"}}],
            "tools[0].function.name",
            '"get weather" is not a tool name',
        ),
        (
            [{"type": "retrieval", "function": {"name": "get_weather"}}],
            "tools[0].type",
            'expected "function", got "retrieval"',
        ),
        (
            [{"type": "function", "function": {"name": "get_weather", "parameters": "city"}}],
            "tools[0].function.parameters",
            "expected a JSON Schema object",
        ),
        (
            [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "string"}}}],
            "tools[0].function.parameters.type",
            "the arguments schema must describe an object",
        ),
        (
            [{"type": "function", "function": {"name": "get_weather", "description": 5}}],
            "tools[0].function.description",
            "expected a string, got a number",
        ),
    ],
)
def test_it_reports_malformed_tools(tools, path, message):
    report, _ = validate(line(function_calling_example(tools=tools)))

    bad_tools = [error for error in report.errors if error.code == "bad_tools"]
    assert [(error.path, error.message[: len(message)]) for error in bad_tools] == [(path, message)]


def test_it_reports_a_tool_declared_twice():
    example = function_calling_example()
    example["tools"] = example["tools"] * 2
    report, _ = validate(line(example))

    assert str(only_error(report)) == 'line 1: tools[1].function.name: "get_weather" is declared twice'


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("cat.png", '"cat.png" is not an image address'),
        ("data:image/png;base64,@@@@", 'the data after "base64," is not valid base64'),
        (data_url(b"GIF-but-not-really"), "the decoded data is not an image"),
        (data_url(png_bytes(4, 4)[:12]), "the PNG header is cut short"),
    ],
)
def test_it_reports_bad_or_undecodable_images(url, message):
    report, _ = validate(line(GOOD) + line(image_question(url)))

    error = only_error(report)
    assert (error.line, error.path, error.code) == (2, "messages[0].content[0].image_url.url", "bad_image")
    assert error.message.startswith(message)


def test_it_reports_an_image_part_without_url_object():
    example = image_question("https://example.com/cat.png")
    example["messages"][0]["content"][0]["image_url"] = "https://example.com/cat.png"
    report, _ = validate(line(example))

    error = only_error(report)
    assert (error.path, error.code) == ("messages[0].content[0].image_url", "bad_image")


def test_it_reports_an_assistant_image_reply_with_more_than_one_part():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/out.png"}}
    example = {
        "messages": [{"role": "user", "content": "Draw a cat"}, {"role": "assistant", "content": [image, image]}]
    }
    report, _ = validate(line(example))

    assert str(only_error(report)) == (
        "line 1: messages[1].content: an assistant image reply (text-to-image) must be a list with exactly one image_url part"
    )


@pytest.mark.parametrize(
    ("message", "path", "text"),
    [
        ({"role": "assistant", "content": "Hello", "weight": 2}, "messages[2].weight", "2 is not 0 or 1"),
        ({"role": "assistant", "content": "Hello", "weight": True}, "messages[2].weight", "true is not 0 or 1"),
        ({"role": "assistant", "content": "Hello", "weight": 0.5}, "messages[2].weight", "0.5 is not 0 or 1"),
    ],
)
def test_it_reports_a_weight_other_than_0_or_1(message, path, text):
    example = chat("Hi", "x")
    example["messages"][2] = message
    report, _ = validate(line(example))

    error = only_error(report)
    assert (error.path, error.code) == (path, "bad_weight")
    assert error.message.startswith(text)


def test_it_reports_a_weight_on_a_user_message():
    example = chat("Hi", "Hello")
    example["messages"][1]["weight"] = 1
    report, _ = validate(line(example))

    assert (
        str(only_error(report))
        == "line 1: messages[1].weight: only assistant messages take a weight, not user messages"
    )


def test_it_reports_invalid_utf8_on_its_line():
    data = (
        line(GOOD)
        + line(GOOD)
        + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1")
        + line(GOOD)
    )
    report, written = validate(data)

    error = only_error(report)
    assert (error.line, error.code) == (3, "invalid_utf8")
    assert error.message == "byte 47 (0xe9) is not valid UTF-8; save the file as UTF-8"
    assert len(written) == 3


def test_it_reports_an_empty_file():
    report, _ = validate(b"")

    assert str(only_error(report)) == "the file is empty; expected one JSON example per line"
    assert report.ok is False and report.format == "unknown"


def test_it_reports_a_file_of_blank_lines_as_empty():
    report, _ = validate(b"\n\r\n   \n")

    assert only_error(report).code == "empty_file"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"PK\x03\x04" + b"\x00\x01\n" * 5000, "a ZIP archive (or an .xlsx/.docx file)"),
        (png_bytes(100, 100) + b"\n" * 5000, "a PNG image"),
        (b"ab\x00cd\n" * 10000, "a binary file"),
        ('{"messages": []}\n'.encode("utf-16"), "UTF-16 text"),
    ],
)
def test_it_reports_a_binary_file_once(data, what):
    report, written = validate(data)

    error = only_error(report)
    assert (error.line, error.code) == (None, "binary_file")
    assert error.message == f"this is {what}, not a JSON Lines text file; export the data as .jsonl"
    assert report.error_counts == {"binary_file": 1}
    assert written == []


def test_it_reports_a_line_too_long_and_goes_on(monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 300)
    long_example = chat("x" * 500, "y")
    report, written = validate(line(GOOD) + line(long_example) + line(GOOD))

    error = only_error(report)
    assert (error.line, error.code) == (2, "line_too_long")
    assert len(written) == 2
    assert report.stats["lines"] == 3


def test_it_reports_preference_pairs_mixed_with_chat():
    pair = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "What?"}],
    }
    report, written = validate(jsonl(GOOD, pair))

    error = only_error(report)
    assert (
        str(error)
        == "line 2: a preference pair in a file of chat examples; a file holds either chat examples or preference pairs"
    )
    assert error.code == "inconsistent_format"
    assert len(written) == 1


def test_it_reports_bad_preference_pairs():
    pair = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "user", "content": "Hello!"}],
    }
    report, _ = validate(line(pair))

    assert [str(error) for error in report.errors] == [
        'line 1: preferred_output[0].role: "user" is not one of assistant',
        "line 1: non_preferred_output: is missing; expected a list of assistant messages",
    ]


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({"prompt": "Hi", "completion": 5}, "line 1: completion: expected a string, got a number"),
        (
            {"instruction": "Add 2 and 2"},
            "line 1: output: is missing; an alpaca example needs instruction and output (input and system are optional)",
        ),
        ({"instruction": "Add", "input": ["2"], "output": "4"}, "line 1: input: expected a string, got an array"),
        (
            {"conversations": [{"from": "user", "value": "Hi"}]},
            'line 1: conversations[0].from: "user" is not one of human, gpt, system, function_call, observation',
        ),
        (
            {"conversations": [{"from": "human"}]},
            "line 1: conversations[0].value: is missing; a human turn needs a value",
        ),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "{}"}]},
            "line 1: conversations[1]: an observation turn must follow a function_call turn",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "function_call", "value": "get_weather(Paris)"},
                ]
            },
            'line 1: conversations[1].value: a function_call turn must hold JSON such as {"name": "...", "arguments": {...}}',
        ),
        (
            {"conversations": [{"from": "system", "value": "Be nice"}, {"from": "human", "value": "Hi"}]},
            "line 1: conversations: has no assistant message, so there is nothing to learn; add the reply the model should give",
        ),
    ],
)
def test_it_reports_errors_in_formats_it_converts(example, expected):
    report, written = validate(line(example))

    assert str(only_error(report)) == expected
    assert written == []


def test_it_reports_every_problem_of_a_line():
    example = {
        "messages": [
            {"role": "bot", "content": "Hi"},
            {"role": "user", "content": 1},
            {"role": "assistant", "content": "ok", "weight": 3},
        ]
    }
    report, _ = validate(line(example))

    assert [error.code for error in report.errors] == ["bad_role", "bad_content", "bad_weight"]


def test_it_lists_the_first_100_errors_and_counts_them_all():
    bad_role = chat("Hi", "Hello")
    bad_role["messages"][1]["role"] = "human"
    data = b"not json\n" * 150 + line(bad_role) * 100 + line(GOOD) * 3 + b"[]\n" * 7
    report, written = validate(data)

    assert len(report.errors) == 100
    assert report.errors[-1].line == 100
    assert report.error_counts == {"invalid_json": 150, "bad_role": 100, "not_an_object": 7}
    assert report.stats["invalid_lines"] == 257
    assert len(written) == 3
    assert "Errors (first 100 of 257):" in report.summary_text()


def test_it_never_reads_the_whole_file_at_once():
    class LineOnly(io.BytesIO):
        def read(self, *args):
            raise AssertionError("read() called")

        def readlines(self, *args):
            raise AssertionError("readlines() called")

    report = validation.validate_stream(LineOnly(jsonl(GOOD, GOOD)))

    assert report.ok and report.examples == 2


def test_it_reports_two_calls_with_one_id_in_a_message():
    example = function_calling_example()
    example["messages"][2]["tool_calls"] = [weather_call("call_1"), weather_call("call_1", '{"city": "Rome"}')]
    report, _ = validate(jsonl(GOOD, example))

    error = only_error(report)
    assert (error.line, error.path, error.code) == (2, "messages[2].tool_calls[1].id", "bad_tool_calls")
    assert "already the id of an earlier call in this message" in error.message
