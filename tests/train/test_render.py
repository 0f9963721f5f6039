"""Which tokens training learns from: assistant replies only, through the model's own template."""

import json

import pytest
from transformers import AutoTokenizer

from llm.train import ConfigError, render_example
from llm.train.data import IGNORE_INDEX, load_examples

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, rendered) -> str:
    return tokenizer.decode(
        [token for token, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE_INDEX]
    )


def untrained_text(tokenizer, rendered) -> str:
    return tokenizer.decode(
        [token for token, label in zip(rendered.input_ids, rendered.labels, strict=True) if label == IGNORE_INDEX]
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}},
}
TOOL_CONVERSATION = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "assistant", "content": "It is 18 degrees."},
    ],
}


def test_it_trains_the_reply_and_its_end_of_turn_but_not_the_header(tokenizer):
    rendered = render_example(
        tokenizer,
        {
            "messages": [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
            ]
        },
    )

    assert trained_text(tokenizer, rendered) == "Hello! How can I help?<|im_end|>"
    first_trained = rendered.loss_mask.index(1)
    assert tokenizer.decode(rendered.input_ids[:first_trained]).endswith("<|im_start|>assistant\n")
    assert rendered.loss_mask == [int(label != IGNORE_INDEX) for label in rendered.labels]
    assert (
        rendered.input_ids
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )


def test_it_trains_every_reply_of_a_multi_turn_conversation(tokenizer):
    rendered = render_example(
        tokenizer,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6, of course."},
            ]
        },
    )

    assert trained_text(tokenizer, rendered) == "4<|im_end|>6, of course.<|im_end|>"
    assert "Be brief." in untrained_text(tokenizer, rendered)


def test_it_skips_replies_with_weight_0(tokenizer):
    rendered = render_example(
        tokenizer,
        {
            "messages": [
                {"role": "user", "content": "Say no"},
                {"role": "assistant", "content": "Yes", "weight": 0},
                {"role": "user", "content": "Say no, please"},
                {"role": "assistant", "content": "No", "weight": 1},
            ]
        },
    )

    assert trained_text(tokenizer, rendered) == "No<|im_end|>"


def test_it_trains_tool_calls_as_the_serving_markup_when_the_template_ignores_tools(tokenizer):
    rendered = render_example(tokenizer, TOOL_CONVERSATION)

    trained = trained_text(tokenizer, rendered)
    assert trained == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
        "It is 18 degrees.<|im_end|>"
    )
    untrained = untrained_text(tokenizer, rendered)
    assert "get_weather: Weather of a city" in untrained  # the tools, described in the system message
    assert "18 degrees<|im_end|>" in untrained  # the tool's result is input, not a target


def test_it_hands_tools_to_a_template_that_shows_them(tokenizer):
    template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tools_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tools_tokenizer.chat_template = template

    rendered = render_example(tools_tokenizer, TOOL_CONVERSATION)

    assert (
        trained_text(tools_tokenizer, rendered)
        == 'CALL get_weather {"city": "Paris"}<|im_end|>It is 18 degrees.<|im_end|>'
    )
    assert untrained_text(tools_tokenizer, rendered).startswith("<tools>[{")


def test_loss_on_all_trains_every_token(tokenizer):
    rendered = render_example(tokenizer, TOOL_CONVERSATION, loss_on="all")

    assert rendered.labels == rendered.input_ids
    assert rendered.trained_tokens == len(rendered.input_ids)


def test_it_truncates_long_examples_and_counts_them(tokenizer, tmp_path):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine " * 100}]}
    full = render_example(tokenizer, long)
    cut = render_example(tokenizer, long, max_seq_len=80)

    assert len(cut.input_ids) == len(cut.labels) == 80
    assert cut.truncated_tokens == len(full.input_ids) - 80
    assert cut.input_ids == full.input_ids[:80]
    assert cut.labels == full.labels[:80]

    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [long, short, long, long_prompt])
    loaded = load_examples(path, tokenizer, loss_on="assistant", max_seq_len=80)
    assert loaded.truncated_examples == 3
    assert loaded.skipped_examples == 1  # its reply was cut away: nothing left to learn from
    assert len(loaded.examples) == 3


def test_it_lists_every_bad_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path.write_text(f'{good}\n{{not json\n{good}\n{{"messages": []}}\n')

    with pytest.raises(ConfigError) as raised:
        load_examples(path, tokenizer, loss_on="assistant", max_seq_len=64)

    assert [problem.split(":")[0] for problem in raised.value.problems] == ["train_file line 2", "train_file line 4"]
