"""Token statistics with the tiny model's tokenizer (SmolLM2's, with its chat template)."""

import json

import pytest

from datasets_app.token_stats import IMAGE_TOKENS, estimate_cost, length_histogram, token_statistics
from tests.datasets.support import chat, function_calling_example, image_question


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def rendered_length(tokenizer, messages) -> int:
    return count(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))


def test_it_counts_all_tokens_and_the_assistant_ones(tokenizer):
    example = chat("What is the capital of France?", "Paris is the capital.")
    stats = token_statistics([json.dumps(example).encode()], tokenizer, max_seq_len=512)

    total = rendered_length(tokenizer, example["messages"])
    assert stats["total_tokens"] == stats["billable_tokens"] == total
    assert stats["trained_tokens"] == count(tokenizer, "Paris is the capital.<|im_end|>")
    assert stats["tokens_per_example"] == {"mean": total, "p50": total, "p95": total, "max": total}
    assert stats["examples_over_max_seq_len"] == 0 and stats["warnings"] == []


def test_it_leaves_out_replies_with_weight_0(tokenizer):
    example = chat("Hi", "Hello there", "Bye", "Goodbye")
    example["messages"][2]["weight"] = 0
    stats = token_statistics([example], tokenizer, max_seq_len=512)

    assert stats["trained_tokens"] == count(tokenizer, "Goodbye<|im_end|>")


def test_it_counts_converted_examples_and_tool_calls(tokenizer):
    converted = token_statistics([{"prompt": "2+2?", "completion": "4"}], tokenizer, max_seq_len=512)
    calls = token_statistics([function_calling_example()], tokenizer, max_seq_len=512)

    assert converted["total_tokens"] == rendered_length(
        tokenizer, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    )
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
    assert calls["trained_tokens"] == count(tokenizer, call_text) + count(tokenizer, "It is 21 C in Paris.<|im_end|>")


def test_it_counts_each_image_as_1024_tokens(tokenizer):
    stats = token_statistics([image_question("https://example.com/cat.jpg")], tokenizer, max_seq_len=4096)

    text_only = rendered_length(
        tokenizer, [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A cat."}]
    )
    assert (stats["images"], stats["image_tokens"]) == (1, IMAGE_TOKENS)
    assert stats["total_tokens"] == text_only + IMAGE_TOKENS


def test_it_warns_about_examples_longer_than_the_maximum_with_tokens_lost(tokenizer):
    short, long = chat("Hi", "Hello"), chat("word " * 300, "ok")
    lines = [json.dumps(short).encode(), b"", b"not json", json.dumps(long).encode()]
    stats = token_statistics(lines, tokenizer, max_seq_len=64)

    long_length = rendered_length(tokenizer, long["messages"])
    assert stats["examples"] == 2 and stats["skipped"] == 1
    assert stats["examples_over_max_seq_len"] == 1
    assert stats["tokens_lost"] == long_length - 64
    assert stats["billable_tokens"] == rendered_length(tokenizer, short["messages"]) + 64
    assert stats["warnings"] == [
        {
            "line": 4,
            "path": "",
            "code": "too_long",
            "message": f"the example is {long_length:,} tokens, longer than the maximum sequence length 64: {long_length - 64:,} tokens will be cut off",
        }
    ]
    assert stats["warning_counts"] == {"too_long": 1}


def test_it_gives_percentiles_and_a_histogram_for_a_bar_chart(tokenizer):
    examples = [chat("x " * n, "ok") for n in range(0, 200, 10)]
    stats = token_statistics(examples, tokenizer, max_seq_len=1024)

    lengths = sorted(rendered_length(tokenizer, example["messages"]) for example in examples)
    assert stats["tokens_per_example"]["p50"] == lengths[9]
    assert stats["tokens_per_example"]["p95"] == lengths[18]
    histogram = stats["histogram"]
    assert sum(histogram["counts"]) == 20
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert histogram["edges"][-2] <= lengths[-1] < histogram["edges"][-1]


def test_it_bins_lengths_with_a_round_width():
    assert length_histogram([3, 45, 99, 100]) == {
        "edges": [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105],
        "counts": [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
    }
    assert length_histogram([]) == {"edges": [], "counts": []}
    assert length_histogram([7]) == {"edges": [0, 1, 2, 3, 4, 5, 6, 7, 8], "counts": [0, 0, 0, 0, 0, 0, 0, 1]}


def test_it_estimates_cost_from_billable_tokens_epochs_and_price():
    assert estimate_cost(250_000, 3, 0.008) == pytest.approx(6.0)
    assert estimate_cost(0, 3, 0.008) == 0
    with pytest.raises(ValueError, match="must not be negative"):
        estimate_cost(1000, -1, 0.008)


def test_it_counts_what_the_training_engine_renders(tokenizer):
    data = pytest.importorskip("llm.train.data")
    examples = [chat("Hi", "Hello there", "Bye", "See you"), function_calling_example()]
    stats = token_statistics(examples, tokenizer, max_seq_len=4096)

    rendered = [data.render_example(tokenizer, example) for example in examples]
    assert stats["total_tokens"] == sum(len(r.input_ids) for r in rendered)
    assert stats["trained_tokens"] == sum(r.trained_tokens for r in rendered) > 0


def test_it_counts_image_examples_as_the_training_engine_renders_their_text(tokenizer):
    data = pytest.importorskip("llm.train.data")
    question = image_question("https://example.com/cat.jpg")
    question["messages"][0]["content"].append(
        {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}}
    )
    drawing = {
        "messages": [
            {"role": "user", "content": "Draw a cat."},
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": "https://example.com/drawn.png"}}],
            },
        ]
    }
    stats = token_statistics([question, drawing], tokenizer, max_seq_len=4096)

    question_text = data.render_example(tokenizer, chat("What is this?", "A cat.", system=None))
    drawing_text = data.render_example(tokenizer, chat("Draw a cat.", "", system=None))
    assert (stats["images"], stats["image_tokens"]) == (3, 3 * IMAGE_TOKENS)
    assert stats["total_tokens"] == len(question_text.input_ids) + len(drawing_text.input_ids) + 3 * IMAGE_TOKENS
    assert stats["trained_tokens"] == question_text.trained_tokens + drawing_text.trained_tokens + IMAGE_TOKENS


def test_billable_tokens_for_another_maximum_length_match_a_count_at_that_length(tokenizer):
    from datasets_app.token_stats import billable_tokens_at

    lines = [json.dumps(chat("word " * n, "ok")).encode() for n in (5, 150, 300, 700, 1500)]
    stats = token_statistics(lines, tokenizer, max_seq_len=1024)
    for cap in (256, 512, 2048):
        assert billable_tokens_at(stats, cap) == token_statistics(lines, tokenizer, max_seq_len=cap)["billable_tokens"]
    # Between two counted lengths: a straight line, never above the true count, within 5% here.
    true = token_statistics(lines, tokenizer, max_seq_len=400)["billable_tokens"]
    assert 0.95 * true <= billable_tokens_at(stats, 400) <= true
    assert billable_tokens_at({}, 1024) is None and billable_tokens_at({"billable_tokens": 7}, 512) == 7
