"""Chat completion parameters through the real `openai` SDK: n, logprobs, penalties, logit_bias, seed,
tool_choice, parallel_tool_calls, response_format, and the 400 for what we cannot honour.

The SDK talks to the real view in this process: its HTTP client's transport hands each request to
Django's async test client (the only stand-in here, at the outer edge) on one event loop kept for the
test, as an ASGI server would, so these run in seconds on tiny models. tests/test_chat_params_live.py
drives the same SDK against the running stack.
"""

import asyncio
import json
import threading
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from ..serve.helpers import COLOR, TOOLS
from ..test_model_square import BASE, folders  # noqa: F401 - shared fixtures

# The view's database reads run on asgiref's thread, with a connection of its own.
pytestmark = pytest.mark.django_db(transaction=True)
CHATTY = "chatty"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


class DjangoTransport(httpx.BaseTransport):
    """httpx's transport that answers each request with Django's async test client, on one event loop
    that lives as long as the transport (a stream read on another loop than its view's would end early)."""

    def __init__(self, client):
        self.client = client
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def answer():
            response = await self.client.generic(
                request.method,
                request.url.raw_path.decode(),
                request.read(),
                content_type=request.headers.get("content-type", "application/json"),
            )
            if response.streaming:
                return response, b"".join([chunk async for chunk in response.streaming_content])
            return response, response.content

        response, body = asyncio.run_coroutine_threadsafe(answer(), self.loop).result(timeout=300)
        return httpx.Response(response.status_code, headers=dict(response.items()), content=body)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def sdk(monkeypatch, chatty_model_dir):
    """An openai client of alice's (signed in: the SDK's bearer key is not forwarded)."""
    from django.contrib.auth import get_user_model
    from django.test import AsyncClient

    monkeypatch.setenv("FT_BASE_MODELS", f"{CHATTY}={chatty_model_dir}")
    client = AsyncClient()
    client.force_login(get_user_model().objects.create_user("alice", password="pw-alice-123"))
    transport = DjangoTransport(client)
    http = httpx.Client(transport=transport, base_url="http://testserver")
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="session", http_client=http, max_retries=0)
    http.close()
    transport.close()


def ask(sdk, model=CHATTY, **fields):
    return sdk.chat.completions.create(
        model=model, messages=fields.pop("messages", HELLO), **{"max_tokens": 8, "temperature": 0, **fields}
    )


def streamed(sdk, **fields):
    return list(ask(sdk, stream=True, stream_options={"include_usage": True}, **fields))


def test_n_gives_n_different_choices_that_a_seed_reproduces(sdk):
    one = ask(sdk, temperature=1.0, seed=7)
    three = ask(sdk, n=3, temperature=1.0, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    contents = [c.message.content for c in three.choices]
    assert len(set(contents)) == 3, "each choice samples with a seed of its own"
    assert contents[0] == one.choices[0].message.content, "choice 0 keeps the request's seed"
    assert [c.message.content for c in ask(sdk, n=3, temperature=1.0, seed=7).choices] == contents
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * 8 == three.usage.total_tokens - three.usage.prompt_tokens


def test_n_streams_each_choice_under_its_index_and_usage_once(sdk):
    chunks = streamed(sdk, n=2, temperature=1.0, seed=3)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length"}
    whole = ask(sdk, n=2, temperature=1.0, seed=3)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_seed_makes_sampling_reproducible(sdk):
    first, again, other = (ask(sdk, temperature=1.0, seed=s).choices[0].message.content for s in (11, 11, 12))
    assert first == again != other


def test_logprobs_describe_the_answers_tokens_also_when_streamed(sdk):
    answer = ask(sdk, logprobs=True, top_logprobs=2)
    choice = answer.choices[0]
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content and len(entries) == 8
    for entry in entries:
        # Greedy takes a most likely token: the first of the top ones, or one tied with it (a tiny random model ties).
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert (
            entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
        )  # part of a character: "\ufffd"
    chunks = streamed(sdk, logprobs=True, top_logprobs=2)
    streamed_entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed_entries] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]
    assert ask(sdk).choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_a_400_naming_it(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, top_logprobs=2)
    assert refused.value.param == "top_logprobs"


def test_a_stop_string_ends_the_answer(sdk):
    plain = ask(sdk, max_tokens=12).choices[0].message.content
    word = plain.split()[2]
    stopped = ask(sdk, max_tokens=12, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert plain.startswith(stopped.message.content)


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_stop_the_tiny_model_repeating_itself(sdk, penalty):
    fields = {"model": BASE, "logprobs": True, "max_tokens": 10}
    tokens = {e.token for e in ask(sdk, **fields).choices[0].logprobs.content}
    assert len(tokens) == 1, "the tied tiny model repeats one token"
    penalised = {e.token for e in ask(sdk, **fields, **{penalty: 2.0}).choices[0].logprobs.content}
    assert len(penalised) > 1


def test_logit_bias_forces_a_token_and_an_unknown_id_is_a_400(sdk):
    from transformers import AutoTokenizer

    from llm.bundled import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(Path("var/test-cache/tiny-random-smollm2")))
    [the] = tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert ask(sdk, max_tokens=4, logit_bias={str(the): 100}).choices[0].message.content == " the" * 4
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, logit_bias={"123456789": 5})
    assert refused.value.param == "logit_bias"


def test_json_schema_answers_parse_and_validate(sdk):
    response_format = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR, "strict": True}}
    answer = ask(sdk, n=3, temperature=1.0, seed=5, max_tokens=40, response_format=response_format)
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), COLOR)
    chunks = streamed(sdk, temperature=1.0, seed=5, max_tokens=40, response_format=response_format)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content


def test_json_object_answers_are_never_fenced(sdk):
    content = ask(sdk, max_tokens=6, response_format={"type": "json_object"}).choices[0].message.content
    assert content.startswith("{")  # the random model seldom closes it; the real model's test parses one


@pytest.mark.realmodel
def test_the_real_model_answers_a_json_object_that_parses(sdk, bundled_model_dir, monkeypatch):
    monkeypatch.setenv("FT_BASE_MODELS", f"real={bundled_model_dir}")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    answer = ask(sdk, model="real", messages=messages, max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_tool_choice_required_and_named_answer_with_valid_calls(sdk):
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in (1, 2):
        choice = ask(
            sdk,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=60,
            parallel_tool_calls=False,
        ).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
    named = {"type": "function", "function": {"name": "weather"}}
    [call] = ask(sdk, tools=TOOLS, tool_choice=named, max_tokens=60).choices[0].message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_parallel_tool_calls_false_gives_at_most_one_call(sdk):
    many = ask(sdk, tools=TOOLS, tool_choice="required", max_tokens=80).choices[0].message.tool_calls
    assert len(many) > 1, "greedy, the chatty model calls again and again when it may"
    one = ask(sdk, tools=TOOLS, tool_choice="required", max_tokens=80, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_tool_choice_none_and_auto(sdk):
    hidden = ask(sdk, tools=TOOLS, tool_choice="none", max_tokens=2)
    plain = ask(sdk, max_tokens=2)
    auto = ask(sdk, tools=TOOLS, tool_choice="auto", max_tokens=2)
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert hidden.choices[0].message.tool_calls is None


def test_a_named_tool_that_is_not_offered_is_a_400(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert refused.value.param == "tool_choice"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"n": 9}, "n"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
    ],
)
def test_what_we_cannot_honour_is_a_400_naming_it(sdk, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, **fields)
    assert refused.value.param == param


def test_harmless_fields_the_sdks_send_are_accepted(sdk):
    answer = ask(
        sdk,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        modalities=["text"],
        safety_identifier="s",
        extra_body={"request_id": "r-1", "user_id": "z", "do_sample": False, "thinking": None},
    )
    assert answer.choices[0].message.content
