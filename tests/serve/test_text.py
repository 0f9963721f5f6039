import random

import pytest

from llm.serve.text import IncrementalDecoder, OutputFilter


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def decode_one_by_one(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(token) for token in ids] + [decoder.flush()]


def test_it_reassembles_multibyte_text_exactly(tokenizer):
    text = "héllo wörld 你好，世界 🙂🎉 naïve café\n  two  spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_one_by_one(tokenizer, ids)
    assert len(ids) > len(text.split())  # some characters span several tokens
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_it_reassembles_random_tokens_like_a_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
        full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(decode_one_by_one(tokenizer, ids)) == full


def test_it_skips_special_tokens(tokenizer):
    ids = tokenizer("<|im_start|>hi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert "".join(decode_one_by_one(tokenizer, ids)) == "hi"


def feed(output, pieces):
    return [output.push(piece) for piece in pieces]


def test_it_cuts_at_a_stop_string_split_over_pieces():
    output = OutputFilter(stop=["<END>"])
    shown = feed(output, ["Hello wor", "ld <E", "ND> and more"])
    assert "".join(shown) == "Hello world "
    assert output.stopped and output.text == "Hello world "
    assert output.push("ignored") == ""


def test_it_holds_back_a_possible_stop_string_until_it_is_not_one():
    output = OutputFilter(stop=["<END>"])
    assert output.push("a <E") == "a "
    assert output.push("xit") == "<Exit"
    assert not output.stopped
    assert output.finish() == ("a <Exit", [], "")


def test_it_stops_at_the_earliest_of_several_stop_strings():
    output = OutputFilter(stop=["world", "lo"])
    feed(output, ["hello world"])
    assert output.text == "hel"


def test_it_keeps_tool_call_markup_out_of_the_shown_text():
    output = OutputFilter(tools=True)
    shown = feed(
        output,
        ["Let me check.", " <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>'],
    )
    content, tool_calls, last_piece = output.finish()
    assert "".join(shown) == "Let me check."
    assert content == "Let me check." and last_piece == ""
    assert tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_it_holds_a_bare_json_reply_until_the_end():
    output = OutputFilter(tools=True)
    shown = feed(output, ["\n{", '"name": "f", "arguments": {}', "}"])
    assert shown == ["", "", ""]
    content, tool_calls, last_piece = output.finish()
    assert content == "" and last_piece == ""
    assert [call["function"] for call in tool_calls] == [{"name": "f", "arguments": "{}"}]


def test_it_shows_held_text_at_the_end_when_it_was_no_tool_call():
    output = OutputFilter(tools=True)
    shown = feed(output, ["{not json", "} really"])
    content, tool_calls, last_piece = output.finish()
    assert tool_calls == [] and content == "{not json} really"
    assert "".join(shown) + last_piece == content
