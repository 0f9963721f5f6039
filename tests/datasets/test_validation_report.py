"""What a valid upload gives: the report, its warnings, stats and the normalized lines."""

import json

from datasets_app.validation import RECOMMENDED_MIN_EXAMPLES
from tests.datasets.support import (
    chat,
    data_url,
    function_calling_example,
    image_question,
    jsonl,
    line,
    png_bytes,
    validate,
)

GOOD = chat("Hi", "Hello!")
MANY = [chat(f"Question {n}", f"Answer {n}") for n in range(RECOMMENDED_MIN_EXAMPLES)]


def test_it_accepts_a_bom_crlf_line_ends_and_blank_lines():
    data = (
        b"\xef\xbb\xbf"
        + line(GOOD).replace(b"\n", b"\r\n")
        + b"\r\n\n   \n"
        + line(chat("Bye", "Goodbye!")).replace(b"\n", b"\r\n")
    )
    report, written = validate(data)

    assert report.ok and report.errors == []
    assert report.examples == 2
    assert written == [GOOD, chat("Bye", "Goodbye!")]
    assert (report.stats["lines"], report.stats["blank_lines"], report.stats["bytes"]) == (5, 3, len(data))


def test_it_copies_chat_lines_and_converts_other_formats_in_the_output():
    lines = [
        {**GOOD, "id": "ex-1"},
        {"prompt": "2+2?", "completion": "4"},
        function_calling_example(),
    ]
    report, written = validate(jsonl(*lines))

    assert report.ok and report.format == "mixed"
    assert written == [
        GOOD,
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        function_calling_example(),
    ]
    assert report.stats["conversions"] == {"prompt_completion": 1}
    assert report.stats["formats"] == {"chat": 1, "prompt_completion": 1, "function_calling": 1}


def test_a_stray_line_in_another_format_is_taken_with_a_warning_that_names_it():
    report, _ = validate(jsonl(*MANY[:5], {"prompt": "2+2?", "completion": "4"}, {"instruction": "a", "output": "b"}))
    assert report.ok
    [mixed] = [w for w in report.warnings if w.code == "mixed_formats"]
    assert mixed.message.startswith(
        "most examples are chat, but 1 prompt/completion (first at line 6), 1 alpaca (first at line 7)"
    )
    # Chat with tool calls or images is one family: no warning.
    assert "mixed_formats" not in validate(jsonl(function_calling_example(), GOOD))[0].warning_counts


def test_it_writes_preference_pairs_as_they_are():
    pair = {
        "input": {"messages": [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "What?"}],
    }
    report, written = validate(jsonl(pair, pair | {"input": {"messages": [{"role": "user", "content": "Yo"}]}}))

    assert report.ok and report.format == "preference"
    assert written[0] == pair
    assert report.stats["examples_without_system"] == 1


def test_it_names_the_file_format():
    calls_and_plain = jsonl(function_calling_example(), GOOD)
    images_and_plain = jsonl(image_question("https://example.com/cat.jpg"), GOOD)

    assert validate(line(GOOD))[0].format == "chat"
    assert validate(calls_and_plain)[0].format == "function_calling"
    assert validate(images_and_plain)[0].format == "image"
    assert validate(jsonl({"instruction": "a", "output": "b"}))[0].format == "alpaca"
    assert validate(jsonl(function_calling_example(), image_question("https://example.com/a.png")))[0].format == "mixed"


def test_it_counts_messages_tool_calls_and_images():
    picture = png_bytes(320, 200)
    report, _ = validate(
        jsonl(
            GOOD,
            function_calling_example(),
            image_question(data_url(picture)),
            image_question("https://example.com/a.jpg"),
        )
    )

    stats = report.stats
    assert stats["examples"] == 4
    assert stats["messages_per_example"] == {"mean": 3.0, "max": 5}
    assert stats["tool_calls"] == 1
    assert (stats["images"], stats["inline_images"], stats["largest_image"]) == (2, 1, [320, 200])


def test_it_warns_once_about_missing_system_messages_with_the_count():
    report, _ = validate(jsonl(*MANY[:47], *[chat("Hi", f"Hello {n}", system=None) for n in range(3)]))

    summary = [warning for warning in report.warnings if warning.code == "no_system_message"]
    assert len(summary) == 1
    assert (
        str(summary[0])
        == "3 of 50 examples have no system message; that is fine if you will not send one when using the model"
    )
    assert report.warning_counts == {"no_system_message": 1}
    assert report.ok


def test_it_warns_about_exact_duplicates_naming_the_first_line():
    report, written = validate(jsonl(*MANY, MANY[3], GOOD, MANY[3]))

    duplicates = [str(warning) for warning in report.warnings if warning.code == "duplicate_example"]
    assert duplicates == ["line 51: same as line 4", "line 53: same as line 4"]
    assert report.stats["duplicates"] == 2
    assert len(written) == 53


def test_it_warns_about_empty_assistant_content():
    report, _ = validate(jsonl(*MANY, chat("Hi", "  "), {"prompt": "Hi", "completion": ""}))

    assert [str(warning) for warning in report.warnings] == [
        "line 51: messages[2].content: the assistant reply is empty, so the model learns to say nothing",
        "line 52: completion: the completion is empty, so the model learns to say nothing",
        "1 of 52 examples have no system message; that is fine if you will not send one when using the model",
        "most examples are chat, but 1 prompt/completion (first at line 52); each line is converted to chat, "
        "which is fine if the mix is intended",
    ]
    assert report.ok


def test_it_warns_when_a_conversation_does_not_end_with_the_assistant():
    report, _ = validate(jsonl(*MANY, chat("Hi", "Hello", "Anything else?")))

    assert [str(warning) for warning in report.warnings] == [
        "line 51: messages[3]: the conversation ends with a user message, which is not learned from; end it with the assistant's reply"
    ]


def test_it_warns_when_every_reply_has_weight_0():
    example = chat("Hi", "Hello")
    example["messages"][2]["weight"] = 0
    report, written = validate(jsonl(*MANY, example))

    assert report.warning_counts == {"no_trained_tokens": 1}
    assert written[-1]["messages"][2]["weight"] == 0


def test_it_warns_about_calls_to_undeclared_tools():
    example = function_calling_example()
    example["messages"][2]["tool_calls"][0]["function"]["name"] = "get_time"
    report, _ = validate(jsonl(*MANY, example))

    assert [str(warning) for warning in report.warnings] == [
        'line 51: messages[2].tool_calls[0].function.name: "get_time" is not among the tools declared in "tools"'
    ]


def test_it_warns_when_there_are_fewer_examples_than_recommended():
    few, _ = validate(jsonl(*MANY[:49]))
    enough, _ = validate(jsonl(*MANY))

    assert [str(warning) for warning in few.warnings] == [
        "only 49 examples: fine-tuning needs at least 50 to 100, and several hundred for good results"
    ]
    assert few.ok
    assert enough.warnings == [] and enough.warning_counts == {}


def test_it_caps_the_warning_list_but_counts_them_all():
    report, _ = validate(jsonl(*[chat("Hi", "Hello", f"More {n}?") for n in range(150)]), max_listed=20)

    assert len(report.warnings) == 20
    assert report.warning_counts == {"not_ending_with_assistant": 150}


def test_it_returns_a_json_ready_dict():
    report, _ = validate(jsonl(GOOD, chat("Hi", "Hello", system=None)) + b"oops\n")

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] is False and as_dict["format"] == "chat" and as_dict["examples"] == 2
    assert as_dict["errors"] == [
        {"line": 3, "path": "", "code": "invalid_json", "message": "not valid JSON: Expecting value at column 1"}
    ]
    assert as_dict["error_counts"] == {"invalid_json": 1}
    assert as_dict["warning_counts"] == {"no_system_message": 1, "too_few_examples": 1}
    assert as_dict["stats"]["examples"] == 2


def test_it_summarises_errors_and_warnings_as_text():
    bad = chat("Hi", "Hello")
    bad["messages"][1]["role"] = "bot"
    report, _ = validate(jsonl(GOOD, bad) + b"oops\n")

    assert report.summary_text() == "\n".join(
        [
            "Invalid dataset: 2 errors; fix them and upload the file again.",
            "Errors by kind: bad_role 1, invalid_json 1",
            "Errors:",
            '  line 2: messages[1].role: "bot" is not one of system, developer, user, assistant, tool',
            "  line 3: not valid JSON: Expecting value at column 1",
            "Warnings by kind: too_few_examples 1",
            "Warnings:",
            "  only 1 example: fine-tuning needs at least 50 to 100, and several hundred for good results",
        ]
    )


def test_it_summarises_a_valid_file_in_one_line():
    report, _ = validate(jsonl(*MANY))

    assert report.summary_text() == "Valid chat dataset: 50 examples."
