import json

import pytest

from llm.chat import check_messages
from llm.chat import template_shows_tools as template_has_tools
from llm.chat.tools import parse_tool_calls
from llm.serve.errors import InvalidRequest, ServingError
from llm.serve.prompt import render_prompt

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS_AWARE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_it_parses_tagged_tool_calls_and_keeps_the_rest():
    text = (
        "I'll look both up.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "I'll look both up."
    assert [call["function"]["name"] for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_it_parses_an_unclosed_tool_call_at_the_end():
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert content == "" and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_it_parses_a_bare_json_call_also_in_a_code_fence():
    for text in ('{"name": "f", "arguments": {"a": "é"}}', '```json\n{"name": "f", "parameters": {"a": "é"}}\n```'):
        content, calls = parse_tool_calls(text)
        assert content == "" and calls[0]["function"] == {"name": "f", "arguments": '{"a": "é"}'}


def test_it_keeps_string_arguments_as_they_are():
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"a": 1}'


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        '{"name": "Alice"}',  # JSON, but no arguments: an answer, not a call
        "<tool_call>not json</tool_call>",
        '[{"name": "f", "arguments": {}}, 3]',
    ],
)
def test_it_leaves_text_without_valid_calls_alone(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rendered(tokenizer, messages, tools):
    ids = render_prompt(tokenizer, messages, tools)
    return tokenizer.decode(ids)


def test_it_describes_tools_in_the_system_message_when_the_template_ignores_them(tokenizer):
    assert not template_has_tools(tokenizer)
    text = rendered(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}], [WEATHER_TOOL]
    )
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.")
    assert "get_weather: Current weather for a city" in system and "<tool_call>" in system
    assert text.endswith("<|im_start|>assistant\n")


def test_it_writes_earlier_tool_calls_as_markup_for_such_a_template(tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    text = rendered(tokenizer, messages, [WEATHER_TOOL])
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
        in text
    )
    assert "<|im_start|>tool\n18 C<|im_end|>" in text


def test_it_hands_tools_to_a_template_that_uses_them(tokenizer):
    aware = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    aware.chat_template = TOOLS_AWARE_TEMPLATE
    assert template_has_tools(aware)
    text = rendered(aware, [{"role": "user", "content": "Weather?"}], [WEATHER_TOOL])
    assert text.startswith('<|im_start|>system\nTOOLS:{"type": "function"')
    assert "get_weather: Current weather" not in text


def test_it_hands_earlier_call_arguments_to_a_template_as_a_dict(tokenizer):
    aware = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    aware.chat_template = "{% if tools %}tools:{% endif %}{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    text = rendered(
        aware,
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
        [WEATHER_TOOL],
    )
    assert text == "tools:Paris"


def test_it_lists_every_problem_with_messages():
    problems = check_messages(
        [{"content": "no role"}, {"role": "user"}, "text", {"role": "user", "content": [{"type": "image_url"}]}]
    )
    assert len(problems) == 4
    assert "messages[0].role" in problems[0] and "messages[1] has no content" in problems[1]
    assert check_messages([]) == ["messages must be a non-empty list"]
    assert check_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == []


def test_it_reports_a_conversation_the_template_refuses(tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}x"
    )
    with pytest.raises(InvalidRequest, match="first message must be user"):
        render_prompt(strict, [{"role": "assistant", "content": "hi"}], None)


def test_it_says_when_a_model_has_no_chat_template(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ServingError, match="cannot chat"):
        render_prompt(bare, [{"role": "user", "content": "hi"}], None)
