"""Chat completion parameters through the real `openai` SDK against the running stack: the shared pool in
the web process, then the same requests through a deployment instance (over Redis), which must answer
exactly as the pool did."""

import json
import time

import jsonschema
import openai
import pytest

from llm.bundled import TINY_MODEL_ID

from .serve.helpers import COLOR, TOOLS

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def key(stack):
    return stack.api_key("petra")


@pytest.fixture(scope="module")
def client(stack, key):
    return stack.sdk(key, timeout=300)


@pytest.fixture(scope="module")
def rest(stack, key):
    with stack.rest(key) as http:
        yield http


def ask(client, **fields):
    fields = {"model": TINY_MODEL_ID, "messages": HELLO, "max_tokens": 8, "temperature": 0, **fields}
    return client.chat.completions.create(**fields)


def answers(client) -> tuple[dict, list[float]]:
    """What the parameters under test give, as plain data to compare between the pool and a deployment:
    the texts, tokens and calls (to compare exactly) and the logprobs (to compare as numbers)."""
    numbers: list[float] = []
    sampled = ask(client, n=3, temperature=1.0, seed=4, logprobs=True, top_logprobs=2, presence_penalty=1.0)
    chunks = list(ask(client, stream=True, n=2, temperature=1.0, seed=4, logprobs=True, logit_bias={"30": 4}))
    streamed: dict[int, list[str]] = {0: [], 1: []}
    streamed_numbers: dict[int, list[float]] = {0: [], 1: []}
    for chunk in chunks:  # the two choices' chunks interleave in whatever order they come
        for choice in chunk.choices:
            for entry in choice.logprobs.content if choice.logprobs else []:
                streamed[choice.index].append(entry.token)
                streamed_numbers[choice.index].append(entry.logprob)
    numbers += streamed_numbers[0] + streamed_numbers[1]
    schema_answer = ask(
        client,
        temperature=1.0,
        seed=9,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR}},
    )
    forced = ask(
        client, tools=TOOLS[:1], tool_choice={"type": "function", "function": {"name": "weather"}}, max_tokens=40
    )
    numbers += [e.logprob for c in sampled.choices for e in c.logprobs.content]
    return {
        "sampled": [(c.message.content, [e.token for e in c.logprobs.content]) for c in sampled.choices],
        "usage": sampled.usage.completion_tokens,
        "streamed": streamed,
        "json": schema_answer.choices[0].message.content,
        "call": forced.choices[0].message.tool_calls[0].function.model_dump(),
    }, numbers


def test_the_parameters_through_the_sdk_on_the_shared_pool(client):
    three = ask(client, n=3, temperature=1.0, seed=4)
    assert len({c.message.content for c in three.choices}) == 3 and three.usage.completion_tokens == 24
    assert [c.message.content for c in ask(client, n=3, temperature=1.0, seed=4).choices] == [
        c.message.content for c in three.choices
    ]
    logprobs = ask(client, logprobs=True, top_logprobs=3).choices[0]
    assert "".join(e.token for e in logprobs.logprobs.content) == logprobs.message.content
    repeating = {e.token for e in logprobs.logprobs.content}
    assert len(repeating) == 1, "the tied tiny model repeats one token"
    for penalty in ("presence_penalty", "frequency_penalty"):
        varied = ask(client, logprobs=True, **{penalty: 2.0}).choices[0].logprobs.content
        assert len({e.token for e in varied}) > 1, penalty
    [token] = repeating
    biased = ask(client, logprobs=True, logit_bias={"30": 100}).choices[0].logprobs.content
    assert {e.token for e in biased} != {token}
    word = ask(client, logit_bias={"30": 100}, max_tokens=3).choices[0].message.content[:1]
    stopped = ask(client, logit_bias={"30": 100}, stop=[word]).choices[0]
    assert stopped.message.content == "" and stopped.finish_reason == "stop"

    answer = ask(
        client,
        n=2,
        temperature=1.0,
        seed=1,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR, "strict": True}},
    )
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), COLOR)

    required = ask(client, tools=TOOLS[:1], tool_choice="required", max_tokens=40, parallel_tool_calls=False)
    [call] = required.choices[0].message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert required.choices[0].finish_reason == "tool_calls"
    hidden = ask(client, tools=TOOLS[:1], tool_choice="none", max_tokens=2)
    assert hidden.choices[0].message.tool_calls is None
    assert (
        hidden.usage.prompt_tokens < ask(client, tools=TOOLS[:1], tool_choice="auto", max_tokens=2).usage.prompt_tokens
    )

    for fields, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, **fields)
        assert refused.value.param == param


def wait_for(rest, deployment_id, check, *, timeout=180, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = rest.get(f"/api/deployments/{deployment_id}").json()
        if check(body):
            return body
        time.sleep(0.5)
    raise AssertionError(f"deployment never reached {what}: {body}")


def test_a_deployment_instance_answers_exactly_as_the_pool(client, rest):
    from_pool, pool_numbers = answers(client)
    jsonschema.validate(json.loads(from_pool["json"]), COLOR)
    assert from_pool["usage"] == 24 and all(from_pool["streamed"].values())

    dep = rest.post("/api/deployments", json={"model": TINY_MODEL_ID, "instances": 1}).json()["id"]
    try:
        wait_for(rest, dep, lambda b: b["status"] == "running", what="running")
        from_instance, instance_numbers = answers(client)
        served = wait_for(rest, dep, lambda b: b["requests_served"] >= 7, what="the requests served", timeout=30)
        assert served["requests_served"] >= 7  # 3 + 2 choices, the schema and the tool call: all on the instance
        assert from_instance == from_pool
        assert instance_numbers == pytest.approx(pool_numbers, abs=1e-3)
        with pytest.raises(openai.BadRequestError) as refused:  # the engine's refusal crosses Redis with its field
            ask(client, logit_bias={"99999999": 1})
        assert refused.value.param == "logit_bias"
    finally:
        rest.delete(f"/api/deployments/{dep}")
