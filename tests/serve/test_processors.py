"""Per-row processing in the engine: penalties, logit bias, logprobs, grammars, tool choice.

The chatty tiny model (untied embeddings) wanders through the vocabulary greedily; the shared
tiny model (tied) repeats one token forever, which makes the penalties' effect plain.
"""

import json
import math

import jsonschema
import pytest
import torch

from llm.serve.errors import InvalidRequest
from llm.serve.processors import RowShaper, TokenTable
from llm.serve.schema import GenerationRequest, TextPiece

from .helpers import COLOR, TOOLS, chat, drain, paused
from .test_engine import run_together


def token_ids(pool, base_dir, text):
    tokenizer = pool._base(str(base_dir)).tokenizer
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_penalties_follow_openais_formula():
    request = GenerationRequest(base_path="-", messages=[], presence_penalty=0.5, frequency_penalty=0.25)
    shaper = RowShaper(request, vocab_size=4, device=torch.device("cpu"), tokens=None)
    for token in (1, 1, 2):
        shaper.shape(torch.zeros(4))
        shaper.accept(token)
    # score - frequency * count - presence * (count > 0)
    assert shaper.shape(torch.zeros(4)).tolist() == [0.0, -1.0, -0.75, 0.0]


def test_logit_bias_adds_to_the_named_tokens_only():
    request = GenerationRequest(base_path="-", messages=[], logit_bias={"0": 5, "3": -100})
    shaper = RowShaper(request, vocab_size=4, device=torch.device("cpu"), tokens=None)
    assert shaper.shape(torch.ones(4)).tolist() == [6.0, 1.0, 1.0, -99.0]


def test_a_greedy_answer_is_the_same_with_logprobs_and_they_describe_its_tokens(pool, chatty_model_dir):
    _, plain = drain(pool.generate_stream(chat(chatty_model_dir)))
    pieces, answer = drain(pool.generate_stream(chat(chatty_model_dir, logprobs=True, top_logprobs=3)))
    assert answer.content == plain.content and plain.logprobs is None
    entries = answer.logprobs
    assert len(entries) == answer.completion_tokens  # max_tokens reached: no end-of-turn token to leave out
    assert "".join(e["token"] for e in entries) == answer.content
    for entry in entries:
        assert bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]  # greedy picks the most likely
        assert top[0]["logprob"] == pytest.approx(entry["logprob"]) and entry["logprob"] <= 0
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-5
    # Streamed pieces carry their tokens' entries, in order, and all of them.
    assert all(isinstance(p, TextPiece) for p in pieces)
    assert [e for p in pieces for e in p.logprobs] == entries


def test_top_logprobs_zero_gives_the_chosen_tokens_only(pool, chatty_model_dir):
    _, answer = drain(pool.generate_stream(chat(chatty_model_dir, logprobs=True, max_tokens=4)))
    assert len(answer.logprobs) == 4 and all(e["top_logprobs"] == [] for e in answer.logprobs)


def test_the_penalties_break_a_repeating_answer(pool, tiny_model_dir):
    _, repeating = drain(pool.generate_stream(chat(tiny_model_dir, logprobs=True)))
    assert len({e["token"] for e in repeating.logprobs}) == 1, "the tied tiny model repeats one token"
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        _, varied = drain(pool.generate_stream(chat(tiny_model_dir, logprobs=True, **penalty)))
        assert len({e["token"] for e in varied.logprobs}) > 1, penalty


def test_logit_bias_forces_or_bans_a_token(pool, chatty_model_dir):
    [the] = token_ids(pool, chatty_model_dir, " the")
    _, forced = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=5, logit_bias={str(the): 100})))
    assert forced.content == " the" * 5
    _, plain = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=1, logprobs=True)))
    first = token_ids(pool, chatty_model_dir, plain.logprobs[0]["token"])[0]
    _, banned = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=1, logit_bias={str(first): -100})))
    assert banned.content != plain.content


def test_a_logit_bias_naming_no_token_of_the_model_is_refused_naming_it(pool, chatty_model_dir):
    with pytest.raises(InvalidRequest) as refused:
        pool.generate_stream(chat(chatty_model_dir, logit_bias={"99999999": 1}))
    assert refused.value.param == "logit_bias" and "99999999" in str(refused.value)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_answer_parses_and_validates(pool, chatty_model_dir, seed):
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}
    request = chat(chatty_model_dir, max_tokens=40, temperature=1.0, seed=seed, response_format=response_format)
    _, answer = drain(pool.generate_stream(request))
    assert answer.finish_reason == "stop", answer
    jsonschema.validate(json.loads(answer.content), COLOR)


def test_a_json_object_answer_starts_as_an_object_and_never_in_a_fence(pool, chatty_model_dir):
    request = chat(chatty_model_dir, max_tokens=12, response_format={"type": "json_object"})
    _, answer = drain(pool.generate_stream(request))
    assert answer.content.startswith("{")  # a random model rarely closes it; the real model's test parses it


def test_a_schema_the_grammar_cannot_hold_is_refused_naming_response_format(pool, chatty_model_dir):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(InvalidRequest) as refused:
        pool.generate_stream(chat(chatty_model_dir, response_format=bad))
    assert refused.value.param == "response_format"


@pytest.mark.parametrize("seed", [1, 2])
def test_tool_choice_required_answers_with_a_valid_call(pool, chatty_model_dir, seed):
    request = chat(
        chatty_model_dir,
        max_tokens=60,
        temperature=1.0,
        seed=seed,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    pieces, answer = drain(pool.generate_stream(request))
    assert answer.finish_reason == "tool_calls" and answer.content == "" and not "".join(pieces)
    [call] = answer.tool_calls
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters[call["function"]["name"]])


def test_a_named_tool_choice_calls_that_tool(pool, chatty_model_dir):
    choice = {"type": "function", "function": {"name": "weather"}}
    _, answer = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=60, tools=TOOLS, tool_choice=choice)))
    [call] = answer.tool_calls
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")


def test_tool_choice_none_does_not_show_the_tools(pool, chatty_model_dir):
    _, offered = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=2, tools=TOOLS)))
    _, hidden = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=2, tools=TOOLS, tool_choice="none")))
    _, plain = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=2)))
    assert hidden.prompt_tokens == plain.prompt_tokens < offered.prompt_tokens
    assert hidden.tool_calls == []


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(pool, chatty_model_dir, fields, param):
    with pytest.raises(InvalidRequest) as refused:
        pool.generate_stream(chat(chatty_model_dir, **fields))
    assert refused.value.param == param


def test_shaped_and_plain_rows_share_a_batch_and_the_plain_ones_answer_as_alone(pool, chatty_model_dir):
    plain = [chat(chatty_model_dir, "Hi"), chat(chatty_model_dir, "List three colours.", max_tokens=9)]
    shaped = [
        chat(chatty_model_dir, "Hi", logprobs=True, top_logprobs=2),
        chat(chatty_model_dir, "Hi", frequency_penalty=1.5, logit_bias={"5": 3}),
        chat(
            chatty_model_dir,
            "Hi",
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}},
        ),
    ]
    alone = [drain(pool.generate_stream(r))[1] for r in plain + shaped]
    together = [completion for _, completion in run_together(pool, plain + shaped, chatty_model_dir)]
    assert [c.content for c in together] == [c.content for c in alone]
    assert [e["token"] for e in together[2].logprobs] == [e["token"] for e in alone[2].logprobs]
    assert [e["logprob"] for e in together[2].logprobs] == pytest.approx(
        [e["logprob"] for e in alone[2].logprobs], abs=1e-4
    )
    jsonschema.validate(json.loads(together[4].content), COLOR)


def test_token_bytes_are_exact_for_a_byte_level_vocabulary(pool, chatty_model_dir):
    tokenizer = pool._base(str(chatty_model_dir)).tokenizer
    table = TokenTable(tokenizer)
    [first, *rest] = tokenizer("é€", add_special_tokens=False)["input_ids"]
    joined = b"".join(bytes(table.entry(t)[1]) for t in [first, *rest])
    assert joined.decode() == "é€"


@pytest.mark.parametrize("where", ["mask", "accept"])
def test_a_grammar_that_fails_ends_its_own_request_and_the_batch_goes_on(pool, chatty_model_dir, monkeypatch, where):
    from llm.serve import constraints
    from llm.serve.errors import ServingError

    plain = [chat(chatty_model_dir, "Hi"), chat(chatty_model_dir, "List three colours.", max_tokens=9)]
    shaped = chat(
        chatty_model_dir,
        "Hi",
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}},
    )
    alone = [drain(pool.generate_stream(r))[1] for r in plain]
    calls = []
    real = getattr(constraints.GrammarMatcher, where)

    def fails_on_the_third_call(self, *args):
        calls.append(where)
        if len(calls) == 3:  # past the prefill: in a decoding pass shared with the plain rows
            raise RuntimeError("the matcher is in an error state")
        return real(self, *args)

    monkeypatch.setattr(constraints.GrammarMatcher, where, fails_on_the_third_call)
    with paused(pool._base(str(chatty_model_dir)).model):
        streams = [pool.generate_stream(request) for request in [*plain, shaped]]
    together = [drain(stream)[1] for stream in streams[:2]]
    with pytest.raises(ServingError, match="Constrained decoding failed for this request: the matcher"):
        list(streams[2])

    assert [c.content for c in together] == [c.content for c in alone]
