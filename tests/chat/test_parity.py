"""Training, serving and token statistics see the same tokens for the same conversation.

For every assistant turn k of every fixture conversation, the ids training
learns turn k's reply after are exactly the ids serving feeds the model to
answer the conversation up to turn k, and the statistics count what training
trains. Run with the bundled SmolLM2 tokenizer, the tiny model's, and the tiny
one with a template that shows tools (the other branch of the format).
"""

import copy
import json

import pytest
from transformers import AutoTokenizer

from datasets_app.token_stats import token_statistics
from llm.serve.prompt import render_prompt
from llm.train.data import render_example
from tests.datasets.support import WEATHER_TOOL


def call(call_id: str, city: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def calls_then_answer() -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris and Kyoto?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1", "Paris"), call("call_2", "Kyoto")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
        {"role": "assistant", "content": "Paris 18 C, Kyoto 24 C."},
    ]


CONVERSATIONS = {
    "single turn, no system": {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    },
    "multi-turn with system": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
    "developer instead of system": {
        "messages": [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Merci à vous."},
        ]
    },
    "system and developer": {
        "messages": [
            {"role": "system", "content": "You are a bank assistant."},
            {"role": "developer", "content": "Never give advice."},
            {"role": "user", "content": "Should I buy?"},
            {"role": "assistant", "content": "I cannot advise on that."},
        ]
    },
    "tools with calls and replies": {"tools": [WEATHER_TOOL], "messages": calls_then_answer()},
    "tools and a system message": {
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "system", "content": "Use tools when asked."}, *calls_then_answer()],
    },
    "tool calls in the history, no tools": {"messages": calls_then_answer()},
    "call with content beside it, no tools": {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c", "Oslo")]},
            {"role": "tool", "tool_call_id": "c", "content": "-3 C"},
            {"role": "assistant", "content": "It is -3 C in Oslo."},
        ]
    },
    "weight 0 turns": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey there, what's up?", "weight": 0},
            {"role": "user", "content": "Tell me a fact."},
            {"role": "assistant", "content": "Honey never spoils."},
        ]
    },
    "non-ASCII text": {
        "messages": [
            {"role": "system", "content": "用中文回答。"},
            {"role": "user", "content": "日本の首都は？ Ünïcödé ✓ 🚀"},
            {"role": "assistant", "content": "东京。🗼"},
            {"role": "user", "content": "Спасибо!"},
            {"role": "assistant", "content": " Пожалуйста — de rien."},
        ]
    },
    "text parts": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Both read."}]},
        ]
    },
}

# A ChatML template that shows tools and writes calls itself, like Qwen's and Hermes'.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments | tojson }})</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(
    scope="module", params=["tiny", "tiny, tools template", pytest.param("bundled", marks=pytest.mark.realmodel)]
)
def tokenizer(request):
    if request.param == "bundled":
        return AutoTokenizer.from_pretrained(str(request.getfixturevalue("bundled_model_dir")))
    loaded = AutoTokenizer.from_pretrained(str(request.getfixturevalue("tiny_model_dir")))
    if request.param == "tiny, tools template":
        loaded.chat_template = TOOLS_TEMPLATE
    return loaded


def only_turn_trained(example: dict, k: int) -> dict:
    """The example with every reply's weight 0 except turn k's."""
    trained = copy.deepcopy(example)
    for i, message in enumerate(trained["messages"]):
        if message["role"] == "assistant":
            message["weight"] = 1 if i == k else 0
    return trained


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_training_learns_each_reply_after_exactly_the_prompt_serving_feeds(tokenizer, name):
    example = CONVERSATIONS[name]
    turns = [i for i, message in enumerate(example["messages"]) if message["role"] == "assistant"]
    assert turns
    for k in turns:
        rendered = render_example(tokenizer, only_turn_trained(example, k))
        first_trained = rendered.loss_mask.index(1)
        served = render_prompt(tokenizer, example["messages"][:k], example.get("tools"))

        assert rendered.input_ids[:first_trained] == served, (
            f"turn {k}: training sees\n{tokenizer.decode(rendered.input_ids[:first_trained])!r}\n"
            f"serving feeds\n{tokenizer.decode(served)!r}"
        )


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_a_reply_is_trained_through_its_end_of_turn_and_no_further(tokenizer, name):
    example = CONVERSATIONS[name]
    for k in (i for i, message in enumerate(example["messages"]) if message["role"] == "assistant"):
        rendered = render_example(tokenizer, only_turn_trained(example, k))
        trained = [token for token, label in zip(rendered.input_ids, rendered.loss_mask, strict=True) if label]
        assert tokenizer.decode(trained).endswith("<|im_end|>")
        # The trained run is one block: nothing of the prompt or of later turns in it.
        first = rendered.loss_mask.index(1)
        assert rendered.loss_mask[first : first + len(trained)] == [1] * len(trained)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_statistics_count_the_tokens_training_trains_and_bills(tokenizer, name):
    example = CONVERSATIONS[name]
    rendered = render_example(tokenizer, example)
    stats = token_statistics([json.dumps(example, ensure_ascii=False).encode()], tokenizer, max_seq_len=4096)

    assert stats["skipped"] == 0 and stats["warnings"] == []
    assert stats["total_tokens"] == stats["billable_tokens"] == len(rendered.input_ids)
    assert stats["trained_tokens"] == rendered.trained_tokens > 0

    short = token_statistics([example], tokenizer, max_seq_len=8)
    cut = render_example(tokenizer, example, max_seq_len=8)
    assert short["billable_tokens"] == len(cut.input_ids) == 8
    assert short["trained_tokens"] == cut.trained_tokens


def test_weight_0_replies_are_not_trained_but_stay_in_the_prompt(tokenizer):
    example = CONVERSATIONS["weight 0 turns"]
    rendered = render_example(tokenizer, example)
    trained_text = tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if m])
    assert "Honey never spoils." in trained_text and "what's up" not in trained_text
    assert "what's up" in tokenizer.decode(render_prompt(tokenizer, example["messages"][:3], None))


def test_statistics_skip_and_name_an_example_the_template_refuses(tiny_model_dir):
    strict = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    strict.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role here') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    lines = [
        json.dumps(CONVERSATIONS["tool calls in the history, no tools"]),
        json.dumps(CONVERSATIONS["single turn, no system"]),
    ]
    stats = token_statistics(lines, strict, max_seq_len=512)

    assert stats["examples"] == 1 and stats["skipped"] == 1
    assert stats["warnings"][0]["line"] == 1 and "no tool role here" in stats["warnings"][0]["message"]
    assert stats["warning_counts"] == {"template_refused": 1}
