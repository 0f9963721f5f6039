"""POST /v1/chat/completions over HTTP: refusals in the error shape, stop strings, tool calls; and model deletes."""

import json
from pathlib import Path

import pytest
import torch

from deployments_app.chat.protocol import completion_object
from deployments_app.models import ModelCard
from llm.serve.schema import Completion

from .test_model_square import BASE, alice, body_of, card, folders  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.django_db
SCRIPTED = "scripted"
SCRIPT = '<tool_call>{"name":"weather"}'


@pytest.fixture(scope="session")
def scripted_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny Llama that answers every prompt with SCRIPT, then ends its turn.

    A random model cannot be made to call a tool, and mocking the model would not
    test the parsing the API does. Here the layers add nothing (their output
    projections are zero), so the next token depends only on the current one: each
    token of the script has its own embedding direction, which the output head maps
    to the script's next token; every other token shares direction 0, which leads
    to the script's first token.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chain = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    assert len(set(chain)) == len(chain) < config.hidden_size, "each script token needs its own direction"
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        for direction, token in enumerate(chain):
            head[token, direction] = 20.0
            embed[token].zero_()
            embed[token, direction + 1] = 1.0
    dest = tmp_path_factory.mktemp("scripted-model")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture
def scripted(monkeypatch, scripted_model_dir):
    monkeypatch.setenv("FT_BASE_MODELS", f"{SCRIPTED}={scripted_model_dir}")
    return SCRIPTED


def chat(client, body):
    """POST a dict as JSON, or a str / bytes body exactly as given."""
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post("/v1/chat/completions", raw, content_type="application/json")


def hello(**fields) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, **fields}


def refused(response, param=None, status=400) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error


@pytest.mark.parametrize(
    "field, raw",
    [
        ("max_tokens", "1e400"),
        ("max_tokens", "NaN"),
        ("max_tokens", "2.5"),
        ("max_completion_tokens", "-Infinity"),
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "NaN"),
        ("seed", "1e400"),
    ],
)
def test_numbers_that_are_not_finite_or_not_whole_are_a_400_naming_the_param(client, alice, field, raw):
    fields = {**hello(), field: "RAW"}
    if field != "max_tokens":
        del fields["max_tokens"]  # max_completion_tokens is read only without it
    body = json.dumps(fields).replace('"RAW"', raw)
    assert refused(chat(client, body), param=field)["message"].startswith(f"{field} must be")


@pytest.mark.parametrize(
    "raw", ["[]", "3", '"hi"', "null", "", '{"model": ', b"\xff", '{"max_tokens": ' + "9" * 5000 + "}"]
)
def test_a_body_that_is_not_a_json_object_is_a_400(client, alice, raw):
    refused(chat(client, raw))


@pytest.mark.parametrize(
    "raw, why",
    [
        ("[" * 100_000, "nested too deeply"),
        (
            '{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content holds a lone UTF-16 surrogate",
        ),
        ('{"model": "\\udfff", "messages": []}', "model holds a lone UTF-16 surrogate"),
        (b'{"model": "x", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not valid UTF-8 (byte 58)"),
        ('{"model": "x", "messages": []}'.encode("utf-16"), "not valid UTF-8"),
    ],
)
def test_text_no_model_could_read_is_a_400_saying_where(client, alice, raw, why):
    assert why in refused(chat(client, raw))["message"]
    # An escaped surrogate pair is one character, and welcome.
    assert chat(client, hello(messages=[{"role": "user", "content": "\U0001f600"}])).status_code == 200


@pytest.mark.parametrize("step", ["\u00b2", "9" * 5000, "１"])
def test_a_checkpoint_id_whose_step_is_not_a_plain_number_is_not_found(client, card, step):
    answer = chat(client, hello(model=f"{card.model_id}:ckpt-step-{step}"))
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    response = client.post(
        "/api/deployments", {"model": f"{card.model_id}:ckpt-step-{step}"}, content_type="application/json"
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "messages", [[], "hi", [{"role": "bot", "content": "x"}], [{"role": "user"}], [["user", "hi"]]]
)
def test_bad_messages_are_a_400(client, alice, messages):
    assert refused(chat(client, hello(messages=messages)), param="messages")["message"]


def test_a_prompt_longer_than_the_context_is_a_400(client, alice):
    error = refused(chat(client, hello(messages=[{"role": "user", "content": "word " * 4200}])), param="messages")
    assert "maximum context length is 4096 tokens" in error["message"]


def test_a_stop_string_ends_the_answer_and_is_never_shown(client, alice, scripted):
    plain = chat(client, hello(model=scripted, max_tokens=20)).json()["choices"][0]
    assert plain == {"index": 0, "message": {"role": "assistant", "content": SCRIPT}, "finish_reason": "stop"}
    for stop in ("weather", ["nothing", "weather"]):
        choice = chat(client, hello(model=scripted, max_tokens=20, stop=stop)).json()["choices"][0]
        assert choice["message"]["content"] == '<tool_call>{"name":"' and choice["finish_reason"] == "stop"


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_turn_the_answer_into_tool_calls_with_null_content(client, alice, scripted):
    choice = chat(client, hello(model=scripted, max_tokens=20, tools=TOOLS)).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "weather", "arguments": "{}"}
    assert call["id"].startswith("call_")


def test_streamed_tool_calls_arrive_as_one_indexed_delta(client, alice, scripted):
    response = chat(client, hello(model=scripted, max_tokens=20, tools=TOOLS, stream=True))
    chunks = [json.loads(line[6:]) for line in body_of(response).decode().split("\n\n") if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas), "the call's markup must not stream as text"
    [calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_content_is_null_only_when_the_model_called_a_tool_and_said_nothing():
    meta = {"id": "chatcmpl-x", "created": 0, "model": BASE}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def message(**kw):
        completion = Completion(finish_reason="stop", prompt_tokens=1, completion_tokens=1, **kw)
        return completion_object(completion, meta)["choices"][0]["message"]

    assert message(content="", tool_calls=[call])["content"] is None
    assert message(content="Let me look.", tool_calls=[call])["content"] == "Let me look."
    assert message(content="")["content"] == ""


@pytest.mark.parametrize("prefix", ["/v1", "/api/paas/v4"])
def test_the_zhipuai_fine_tuned_model_delete_answers_deleted_then_404(client, card, prefix):
    url = f"{prefix}/fine_tuning/fine_tuned_models/{card.model_id}"
    response = client.delete(url)
    assert response.status_code == 200
    assert response.json() == {
        "request_id": None,
        "model_name": card.model_id,
        "delete_status": "deleted",
        "id": card.model_id,
        "object": "model",
        "deleted": True,
    }
    assert not ModelCard.objects.filter(pk=card.pk).exists()
    again = client.delete(url)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(("status", "answered"), [(400, 400), (429, 429), (503, 503), (504, 504), (500, 500)])
def test_an_instance_refusal_keeps_its_status(status, answered):
    from deployments_app.chat.serving import _refusal_of
    from deployments_app.deployments.streams import RemoteError
    from finetune_site.api_errors import status_of

    assert status_of(_refusal_of(RemoteError("no", status))) == answered


def test_a_model_whose_files_are_gone_is_a_500_that_names_no_server_path(client, card, caplog):
    import shutil

    shutil.rmtree(card.path)
    response = chat(client, hello(model=card.model_id))
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_error" and "adapter is missing" in error["message"]
    assert card.path not in error["message"] and "/" not in error["message"]
    assert card.path in caplog.text  # the administrator still finds where, in the log


def test_a_full_engine_answers_429_with_retry_after_and_the_running_stream_finishes(client, alice, monkeypatch):
    from deployments_app.catalog import resolve_model
    from deployments_app.chat import pool as shared
    from llm.serve.pool import ModelPool
    from llm.serve.schema import GenerationRequest

    base_path = str(resolve_model(alice, BASE).base_path)
    messages = [{"role": "user", "content": "hi"}]
    probe = ModelPool(device="cpu", dtype="float32")
    per_token = probe._base(base_path).engine.kv.bytes_per_token
    room = probe.count_prompt_tokens(base_path, messages) + 1500
    probe.close()
    full = ModelPool(device="cpu", dtype="float32", kv_memory_bytes=room * per_token, queue_timeout=0.2)
    monkeypatch.setattr(shared, "_pool", full)
    try:
        # Long enough to hold the memory for the whole test (the engine does not wait for its reader);
        # seeded, so the random model never samples its end-of-turn token first (unseeded, it did 1 run in ~30).
        request = GenerationRequest(base_path=base_path, messages=messages, max_tokens=1500, seed=7)
        running = full.generate_stream(request)
        next(running)

        response = chat(client, hello(max_tokens=64))

        assert response.status_code == 429, response.content
        assert 1 <= int(response["Retry-After"]) <= 60
        assert response.json()["error"]["code"] == "engine_overloaded"
        *_, done = list(running)
        assert done.completion_tokens == 1500
    finally:
        full.close()
