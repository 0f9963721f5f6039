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
from llm.serve.schema import Completion

DEFAULT_MAX_TOKENS = 512

GENERATION_FIELDS = ("messages", "tools", "max_tokens", "temperature", "top_p", "stop", "seed", "do_sample")
"""The fields of a parsed request that reach the engine, in the pool or on a deployment's stream."""


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


def parse_chat_body(body) -> dict:
    """Check the request fields the SDKs send; unknown fields and nulls are accepted."""
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
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
    }


def usage_object(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.total_tokens,
    }


def completion_object(completion: Completion, meta) -> dict:
    """The whole answer as one `chat.completion` (a request without `stream`)."""
    # OpenAI answers null, not "", when the model only called tools; SDKs test `content is None`.
    message = {"role": "assistant", "content": completion.content or (None if completion.tool_calls else "")}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return {
        "id": meta["id"],
        "object": "chat.completion",
        "created": meta["created"],
        "model": meta["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
        "usage": usage_object(completion),
    }


def chunk_event(meta, delta, finish_reason=None) -> str:
    """One server-sent event holding a `chat.completion.chunk` with this delta."""
    payload = {
        "id": meta["id"],
        "object": "chat.completion.chunk",
        "created": meta["created"],
        "model": meta["model"],
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "extra_json": {},
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage_event(meta, completion: Completion) -> str:
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
