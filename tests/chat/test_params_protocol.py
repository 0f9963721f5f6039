"""Reading the chat parameters: what is honoured, what is accepted and ignored, what is refused naming itself;
and how pieces with logprobs and the n choices are written and carried."""

import json

import pytest

from deployments_app.chat import protocol
from deployments_app.deployments import streams
from finetune_site.api_errors import ApiError
from llm.serve.schema import Completion, TextPiece

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def refused(**fields) -> ApiError:
    with pytest.raises(ApiError) as caught:
        protocol.parse_chat_body({**BODY, **fields})
    return caught.value


def test_a_plain_body_asks_for_nothing_new():
    params = protocol.parse_chat_body(BODY)
    assert params["n"] == 1 and params["logprobs"] is False and params["top_logprobs"] == 0
    assert params["presence_penalty"] == params["frequency_penalty"] == 0.0
    assert params["logit_bias"] is params["response_format"] is params["tool_choice"] is None
    assert params["parallel_tool_calls"] is True


def test_the_parameters_are_read():
    params = protocol.parse_chat_body(
        {
            **BODY,
            "n": 3,
            "logprobs": True,
            "top_logprobs": 5,
            "presence_penalty": -1.5,
            "frequency_penalty": 2,
            "logit_bias": {"15": -100, "0": 3.5},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": False,
        }
    )
    assert params["n"] == 3 and params["top_logprobs"] == 5
    assert params["presence_penalty"] == -1.5 and params["frequency_penalty"] == 2.0
    assert params["logit_bias"] == {"15": -100.0, "0": 3.5}
    assert params["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert params["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert params["parallel_tool_calls"] is False
    assert all(name in params for name in protocol.GENERATION_FIELDS)


def test_text_response_format_is_free_text():
    assert protocol.parse_chat_body({**BODY, "response_format": {"type": "text"}})["response_format"] is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"the": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"functions": []}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(fields, param):
    error = refused(**fields)
    assert error.param == param and error.status_code == 400


def test_harmless_fields_and_nulls_are_accepted():
    zhipuai = {
        "request_id": "r",
        "user_id": "u",
        "do_sample": False,
        "meta": {"user_info": "x"},
        "sensitive_word_check": {"type": "ALL"},
        "response_format": None,
        "thinking": None,
        "tools": None,
        "tool_choice": None,
    }
    openai = {
        "user": "u",
        "safety_identifier": "s",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "modalities": ["text"],
        "prompt_cache_key": "k",
        "stream_options": {"include_usage": True},
        "audio": None,
        "n": None,
        "logprobs": None,
    }
    for fields in (zhipuai, openai):
        assert protocol.parse_chat_body({**BODY, **fields})["model"] == "m"
    assert set(protocol.IGNORED_FIELDS) >= {"user", "metadata", "request_id", "user_id"}


def test_n_choices_are_written_in_order_with_usage_summed():
    meta = {"id": "chatcmpl-x", "created": 0, "model": "m"}
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    choices = [
        Completion("b", "length", 5, 3, index=1),
        Completion("a", "stop", 5, 2, logprobs=[entry], index=0),
    ]
    written = protocol.completion_object(choices, meta)
    assert [c["index"] for c in written["choices"]] == [0, 1]
    assert written["choices"][0]["logprobs"] == {"content": [entry], "refusal": None}
    assert "logprobs" not in written["choices"][1]
    assert written["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    chunk = protocol.piece_chunk_event(meta, TextPiece("a", [entry], choice=1), logprobs=True)
    [choice] = json.loads(chunk[len("data: ") :])["choices"]
    assert choice["index"] == 1 and choice["logprobs"]["content"] == [entry]


def test_pieces_carry_their_logprobs_over_redis():
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    fields = {k.encode(): v.encode() for k, v in streams.piece_event(TextPiece("a", [entry])).items()}
    piece = streams.decode_reply(fields)
    assert piece == "a" and piece.logprobs == [entry]
    assert streams.decode_reply(streams.piece_event("plain")) == "plain"
    done = streams.decode_reply(streams.done_event(Completion("a", "stop", 1, 1, logprobs=[entry], index=2)))
    assert done.logprobs == [entry] and done.index == 2
    with pytest.raises(streams.RemoteError) as error:
        streams.decode_reply(streams.error_event("bad", status=400, param="logit_bias"))
    assert error.value.param == "logit_bias"
