"""The accepted formats and how each becomes the normalized chat shape."""

import pytest

from datasets_app.formats import InvalidExample, Issue, normalize_example
from tests.datasets.support import WEATHER_TOOL, chat, data_url, function_calling_example, gif_bytes, image_question


def test_it_keeps_a_chat_example_as_it_is():
    example = chat("Hi", "Hello!", "How are you?", "Fine.")
    example["messages"][2]["weight"] = 0

    assert normalize_example(example) == (example, "chat")


def test_it_keeps_only_messages_and_tools():
    example = {**chat("Hi", "Hello!"), "id": 7, "metadata": {"source": "crm"}}

    assert normalize_example(example) == (chat("Hi", "Hello!"), "chat")


def test_it_recognises_function_calling_with_empty_or_null_assistant_content():
    example = function_calling_example()
    example["messages"][2]["content"] = ""

    assert normalize_example(example) == (example, "function_calling")
    assert normalize_example(function_calling_example())[1] == "function_calling"


def test_it_accepts_parallel_tool_calls_answered_in_any_order():
    example = function_calling_example()
    call = example["messages"][2]["tool_calls"][0]
    example["messages"][2]["tool_calls"] = [
        call,
        {**call, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]
    example["messages"][3:4] = [
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 25}'},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]

    assert normalize_example(example)[1] == "function_calling"


def test_it_recognises_image_to_text_with_web_and_inline_images():
    assert normalize_example(image_question("https://example.com/cat.jpg"))[1] == "image"
    assert normalize_example(image_question(data_url(gif_bytes(8, 8), "image/gif")))[1] == "image"


def test_it_recognises_text_to_image():
    example = {
        "messages": [
            {"role": "user", "content": "A red bicycle in the rain"},
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": "https://example.com/bike.png"}}],
            },
        ]
    }

    assert normalize_example(example) == (example, "image")


def test_it_keeps_preference_pairs():
    pair = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "What do you want?"}],
        "tools": [WEATHER_TOOL],
    }

    assert normalize_example(pair) == (pair, "preference")


def test_it_converts_prompt_completion():
    assert normalize_example({"prompt": "Capital of France?", "completion": "Paris"}) == (
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        "prompt_completion",
    )


def test_it_converts_alpaca_with_input_and_system():
    example = {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
        "system": "You translate.",
    }

    assert normalize_example(example) == (
        {
            "messages": [
                {"role": "system", "content": "You translate."},
                {"role": "user", "content": "Translate to French.\n\nGood morning"},
                {"role": "assistant", "content": "Bonjour"},
            ]
        },
        "alpaca",
    )


def test_it_converts_alpaca_without_input():
    converted, source = normalize_example({"instruction": "Say hi.", "input": "", "output": "Hi!"})

    assert source == "alpaca"
    assert converted["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def test_it_converts_sharegpt_turns():
    example = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
    }

    assert normalize_example(example) == (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        "sharegpt",
    )


def test_it_converts_sharegpt_function_calls_and_observations():
    example = {
        "system": "You can look up the weather.",
        "tools": '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]',
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp_c": 21}'},
            {"from": "gpt", "value": "21 C."},
        ],
    }

    converted, source = normalize_example(example)

    assert source == "sharegpt"
    assert converted["tools"][0]["function"]["name"] == "get_weather"
    assert converted["messages"] == [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1_0", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "21 C."},
    ]


def test_it_raises_with_every_issue_when_an_example_is_invalid():
    with pytest.raises(InvalidExample) as raised:
        normalize_example({"messages": [{"role": "bot", "content": "Hi"}, {"role": "user"}]})

    assert [issue.code for issue in raised.value.issues] == ["bad_role", "missing_content"]
    assert (
        str(raised.value)
        == 'messages[0].role: "bot" is not one of system, developer, user, assistant, tool; messages[1].content: is missing; a user message needs content'
    )


def test_it_prints_issues_with_or_without_line_and_path():
    assert str(Issue(3, "messages", "empty_messages", "is empty")) == "line 3: messages: is empty"
    assert str(Issue(None, "", "empty_file", "the file is empty")) == "the file is empty"
    assert str(Issue(2, "", "invalid_json", "not valid JSON")) == "line 2: not valid JSON"
