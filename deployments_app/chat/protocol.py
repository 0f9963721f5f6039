"""The chat completions protocol: reading a request, and the objects and chunks an answer is written as.

What the openai and zhipuai SDKs send and parse; nothing here knows where the
answer comes from. A request that breaks the protocol raises ApiError: this is
the API's own parser, not a service.
"""

import json
import math
import time
import uuid

from finetune_site.api_errors import ApiError, error_body
from llm.serve.processors import MAX_TOP_LOGPROBS
from llm.serve.schema import Completion, piece_index, piece_logprobs

DEFAULT_MAX_TOKENS = 512
MAX_CHOICES = 8
"""The most choices (`n`) one request may ask for: each is an engine stream of its own."""
MAX_LOGIT_BIAS = 300
"""The most tokens one logit_bias may name (OpenAI's own limit)."""

GENERATION_FIELDS = (
    "messages",
    "tools",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "do_sample",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tool_choice",
    "parallel_tool_calls",
)
"""The fields of a parsed request that reach the engine, in the pool or on a deployment's stream."""

IGNORED_FIELDS = {
    "user": "an end-user id for the provider's abuse monitoring; it changes no answer",
    "safety_identifier": "the newer name of `user`",
    "prompt_cache_key": "a hint for a provider's prompt cache; we keep none across requests",
    "prompt_cache_retention": "the same cache's lifetime",
    "metadata": "tags for stored completions; we store none (store must be false)",
    "request_id": "zhipuai's id of the request, for its own logs",
    "user_id": "zhipuai's end-user id, like `user`",
    "meta": "zhipuai's role-play metadata for its character models; other models ignore it there too",
    "sensitive_word_check": "zhipuai's content-review switch; there is no review stage here to switch",
    "extra": "zhipuai's CodeGeeX-only extras; other models ignore them there too",
}
"""Fields the SDKs send that change nothing in an answer here, accepted and ignored (see each reason).

Any other field is either honoured (parse_chat_body reads it) or refused with a 400 naming it:
a parameter silently dropped would give an answer the caller did not ask for.
"""

_UNSUPPORTED = {
    "audio": "audio output is not supported: the models here are text-only",
    "modalities": 'only ["text"] is supported: the models here are text-only',
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy functions parameter is not supported; send tools instead",
    "function_call": "the legacy function_call parameter is not supported; send tool_choice instead",
    "reasoning_effort": "reasoning_effort is not supported: the models here do not reason apart from answering",
    "verbosity": "verbosity is not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_options": "prompt_cache_options is not supported",
    "thinking": "zhipuai's thinking mode is not supported: the models here do not reason apart from answering",
    "store": "storing completions is not supported (store must be false)",
    "service_tier": 'service_tier must be "auto" or "default": there is one tier here',
}
"""Fields a caller may send that we cannot honour, with what the 400 says."""

_HARMLESS_VALUES = {
    "modalities": lambda value: value == ["text"],
    "thinking": lambda value: isinstance(value, dict) and value.get("type") == "disabled",
    "store": lambda value: value is False,
    "service_tier": lambda value: value in ("auto", "default"),
}
"""Values of an unsupported field that ask for what we do anyway, accepted."""

_KNOWN = {"model", "stream", "stream_options", "max_completion_tokens", "n", *GENERATION_FIELDS, *IGNORED_FIELDS}


def _number(body, name, *, low, high, integer=False, low_open=False):
    """Read an optional numeric field, refusing anything out of range as a 400 naming it.

    Python's json reads 1e400 as inf and accepts NaN and Infinity: int() of them
    raises and NaN passes every range comparison, so floats must be finite first.
    """
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or (integer and value != int(value))
    ):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}.", param=name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(f"{name} must be {'>' if low_open else '>='} {low} and <= {high}, got {value}.", param=name)
    return int(value) if integer else float(value)


def _refuse_what_cannot_be_honoured(body: dict) -> None:
    """A 400 naming the first field that asks for something we do not do (nulls ask for nothing)."""
    for name, value in body.items():
        if value is None or name in _KNOWN:
            continue
        harmless = _HARMLESS_VALUES.get(name)
        if harmless is not None and harmless(value):
            continue
        reason = _UNSUPPORTED.get(name, f"{name} is not a chat completion parameter supported here")
        raise ApiError(f"{reason}.", param=name, code="unsupported_parameter")


def parse_chat_body(body) -> dict:
    """Check the request fields the SDKs send; a field we cannot honour is a 400 naming it, nulls are accepted."""
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    _refuse_what_cannot_be_honoured(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("model is required: a base, fine-tuned or checkpoint model id.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects.", param="messages")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4
    ):
        raise ApiError("stop must be a string or a list of up to 4 non-empty strings.", param="stop")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError("tools must be a list of function definitions.", param="tools")
    max_tokens = _number(body, "max_tokens", low=1, high=32768, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", low=1, high=32768, integer=True)
    temperature = _number(body, "temperature", low=0, high=2)
    do_sample = body.get("do_sample")
    stream_options = body.get("stream_options") or {}
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    logprobs = _flag(body, "logprobs")
    top_logprobs = _number(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise ApiError("top_logprobs needs logprobs set to true.", param="top_logprobs")
    return {
        "model": model,
        "messages": messages,
        "tools": tools or None,
        "stop": stop or None,
        "max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": _number(body, "top_p", low=0, high=1, low_open=True) or 1.0,
        "seed": _number(body, "seed", low=0, high=2**63 - 1, integer=True),
        "do_sample": do_sample is not False and (temperature is None or temperature > 0),
        "stream": bool(body.get("stream")),
        "include_usage": isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        "n": _number(body, "n", low=1, high=MAX_CHOICES, integer=True) or 1,
        "presence_penalty": _number(body, "presence_penalty", low=-2, high=2) or 0.0,
        "frequency_penalty": _number(body, "frequency_penalty", low=-2, high=2) or 0.0,
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "logprobs": logprobs,
        "top_logprobs": top_logprobs or 0,
        "response_format": _response_format(body.get("response_format")),
        "tool_choice": tool_choice,
        "parallel_tool_calls": _flag(body, "parallel_tool_calls", default=True),
    }


def _flag(body, name, *, default=False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {value!r}.", param=name)
    return value


def _logit_bias(value):
    """{token id as a string: -100..100}; whether each id is a token of the model is the engine's check."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ApiError(
            f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids (as strings) to numbers.",
            param="logit_bias",
        )
    bias = {}
    for token, number in value.items():
        if not (isinstance(token, str) and token.isdigit()):
            raise ApiError(f"logit_bias keys must be token ids, got {token!r}.", param="logit_bias")
        if isinstance(number, bool) or not isinstance(number, int | float) or not -100 <= number <= 100:
            raise ApiError(f"logit_bias values must be numbers from -100 to 100, got {number!r}.", param="logit_bias")
        bias[str(int(token))] = float(number)
    return bias or None


_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _response_format(value):
    """None for free text, else OpenAI's object, checked here so the engine only compiles it."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _FORMAT_TYPES:
        raise ApiError(
            f"response_format must be an object whose type is one of {', '.join(_FORMAT_TYPES)}, got {value!r}.",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ApiError("response_format json_schema needs json_schema.name (and a schema).", param="response_format")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise ApiError("response_format json_schema.schema must be a JSON schema object.", param="response_format")
    return {
        "type": "json_schema",
        "json_schema": {"name": spec["name"], "schema": schema, "strict": spec.get("strict")},
    }


def _tool_choice(value, tools):
    """None, "none", "auto", "required" or {"type": "function", "function": {"name"}} naming one of the tools."""
    if value is None or value in ("none", "auto"):
        return value
    names = [
        t["function"].get("name") for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if value == "required":
        if not names:
            raise ApiError('tool_choice "required" needs tools to choose from.', param="tool_choice")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or value.get("type", "function") != "function":
        raise ApiError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        raise ApiError(f"tool_choice names {name!r}, which is not one of the tools.", param="tool_choice")
    return {"type": "function", "function": {"name": name}}


def usage_object(completions) -> dict:
    """Token counts of an answer (one Completion, or the n choices of one request: the prompt counted once)."""
    choices = completions if isinstance(completions, list) else [completions]
    prompt = choices[0].prompt_tokens if choices else 0
    generated = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_object(completions, meta) -> dict:
    """The whole answer as one `chat.completion` (a request without `stream`): one Completion or the n choices."""
    choices = completions if isinstance(completions, list) else [completions]
    return {
        "id": meta["id"],
        "object": "chat.completion",
        "created": meta["created"],
        "model": meta["model"],
        "choices": [_choice(completion) for completion in sorted(choices, key=lambda c: c.index)],
        "usage": usage_object(choices),
    }


def _choice(completion: Completion) -> dict:
    # OpenAI answers null, not "", when the model only called tools; SDKs test `content is None`.
    message = {"role": "assistant", "content": completion.content or (None if completion.tool_calls else "")}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    choice = {"index": completion.index, "message": message, "finish_reason": completion.finish_reason}
    if completion.logprobs is not None:
        choice["logprobs"] = {"content": completion.logprobs, "refusal": None}
    return choice


def chunk_event(meta, delta, finish_reason=None, *, index=0, logprobs=None) -> str:
    """One server-sent event holding a `chat.completion.chunk` with this delta (of choice `index`)."""
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs, "refusal": None}
    payload = {
        "id": meta["id"],
        "object": "chat.completion.chunk",
        "created": meta["created"],
        "model": meta["model"],
        "choices": [choice],
        "extra_json": {},
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def piece_chunk_event(meta, piece: str, *, logprobs: bool) -> str:
    """A piece of answer text as a chunk, with the logprobs of its tokens when the request asked for them."""
    return chunk_event(
        meta, {"content": piece}, index=piece_index(piece), logprobs=piece_logprobs(piece) if logprobs else None
    )


def usage_event(meta, completion) -> str:
    """The last chunk of a stream that asked for `stream_options.include_usage`: no choices, only usage."""
    usage = {
        "id": meta["id"],
        "object": "chat.completion.chunk",
        "created": meta["created"],
        "model": meta["model"],
        "choices": [],
        "usage": usage_object(completion),
        "extra_json": {},
    }
    return f"data: {json.dumps(usage)}\n\n"


def error_event(message: str) -> str:
    """A failure after the stream began: the status line is gone, so the error travels in-band."""
    return f"data: {json.dumps(error_body(message, status_code=500, code='model_error'))}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


def answer_meta(model: str) -> dict:
    """The id, time and model every object and chunk of one answer repeats."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
