"""POST /v1/chat/completions: OpenAI/zhipuai chat, streamed as SSE or collected.

An async view (not DRF) because the answer must stream token by token under
ASGI; generation runs in worker threads so the event loop never blocks.
"""

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from finetune_site import jsonbody
from finetune_site.api_errors import ApiError, error_body, error_response
from finetune_site.apiviews import api_user_or_error

from .catalog import resolve_model
from .routing import deployment_events
from .selectors import serving_deployment
from .streams import RemoteError
from llm.serve.errors import InvalidRequest, ServingError
from llm.serve.pool import ModelPool
from llm.serve.schema import Completion, GenerationRequest

log = logging.getLogger(__name__)
_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="chat")
_pool: ModelPool | None = None
_pool_lock = threading.Lock()
DEFAULT_MAX_TOKENS = 512


def get_pool() -> ModelPool:
    """The process-wide pool: each base model loaded once, adapters swapped per request."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool(device=settings.FT_DEVICE, max_adapters=settings.FT_ADAPTER_CACHE_SIZE,
                              max_bases=settings.FT_MAX_LOADED_MODELS)
        return _pool


def _number(body, name, *, low, high, integer=False, low_open=False):
    """Read an optional numeric field, refusing anything out of range as a 400 naming it.

    Python's json reads 1e400 as inf and accepts NaN and Infinity: int() of them
    raises and NaN passes every range comparison, so floats must be finite first.
    """
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or (integer and value != int(value))):
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
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4):
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


def _session_csrf_error(request):
    # Browser calls ride on the session cookie, so they must carry the CSRF token.
    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
    return error_response("CSRF check failed for a session-authenticated call.", status_code=403) if reason else None


@csrf_exempt
async def chat_completions(request):
    if request.method != "POST":
        return error_response("Use POST for chat completions.", status_code=405)
    user, error = await sync_to_async(api_user_or_error)(request)
    if error:
        return error
    if "HTTP_AUTHORIZATION" not in request.META:
        error = await sync_to_async(_session_csrf_error)(request)
        if error:
            return error
    try:
        body = jsonbody.loads(request.body or b"null")
    except ValueError as exc:  # bad JSON, bad UTF-8, or an integer literal too long to read
        return error_response(f"The request body is not valid JSON: {exc}.")
    try:
        params = parse_chat_body(body)
    except ApiError as exc:
        return error_response(exc.message, param=exc.param)
    try:
        events = await open_events(user, params)
    except ChatFailure as exc:
        return error_response(exc.message, status_code=exc.status, param=exc.param, code=exc.code)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": params["model"]}
    if params["stream"]:
        response = StreamingHttpResponse(_Closable(_sse(events, meta, params["include_usage"])), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    completion = None
    try:
        async with aclosing(events):  # a client that leaves cancels this view: stop generating too
            async for event in events:
                if isinstance(event, Completion):
                    completion = event
    except Exception as exc:  # noqa: BLE001 - answer in the error shape, never a bare 500
        log.exception("chat completion failed")
        return error_response(_failure_text(exc), status_code=500, code="model_error")
    return JsonResponse(_completion_object(completion, meta))


class ChatFailure(Exception):
    """A request refused before any token was generated, with the status to answer."""

    def __init__(self, message: str, *, status: int = 400, param=None, code=None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


async def open_events(user, params: dict):
    """Route a parsed chat request to the model's deployment or the shared pool.

    Returns an async iterator of text pieces ending with one Completion; raises
    ChatFailure when the request is refused before generation starts.
    """
    resolved = await sync_to_async(resolve_model)(user, params["model"])
    if resolved is None:
        raise ChatFailure(f"The model {params['model']!r} does not exist or you do not have access to it.",
                          status=404, param="model", code="model_not_found")
    deployment = await sync_to_async(serving_deployment)(user, params["model"])
    if deployment is not None:
        events = deployment_events(deployment, {k: params[k] for k in _REMOTE_FIELDS})
        try:
            first = await anext(events)
        except RemoteError as exc:
            raise ChatFailure(str(exc), status=exc.status, param="messages" if exc.status == 400 else None,
                              code="invalid_request" if exc.status == 400 else "model_error") from exc
        return _prepend(first, events)
    generation = GenerationRequest(
        base_path=str(resolved.base_path),
        adapter_path=str(resolved.adapter_path) if resolved.adapter_path else None,
        **{k: params[k] for k in _REMOTE_FIELDS},
    )
    loop = asyncio.get_running_loop()
    try:
        stream = await loop.run_in_executor(_executor, get_pool().generate_stream, generation)
    except InvalidRequest as exc:
        raise ChatFailure(str(exc), param="messages", code="invalid_request") from exc
    except ServingError as exc:
        raise ChatFailure(str(exc), status=500, code="model_error") from exc
    return _events(stream)


_REMOTE_FIELDS = ("messages", "tools", "max_tokens", "temperature", "top_p", "stop", "seed", "do_sample")


async def _prepend(first, rest):
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event


class _Closable:
    """The SSE generator as Django's streaming content, with the close() Django calls when the response ends.

    Django closes only its own wrapper around an async iterator, so without this a
    client that leaves mid-answer would leave our generators suspended until garbage
    collection, and the model generating for nobody. close() runs in a worker thread:
    it schedules aclose() on the loop, which closes the chain down to the model.
    """

    def __init__(self, events):
        self._events = events
        self._loop = asyncio.get_running_loop()

    def __aiter__(self):
        return self._events

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._events.aclose(), self._loop)


async def _events(stream):
    """Pull a blocking generator from a worker thread; closing this closes it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    abandoned = threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: the client left
            abandoned.set()

    def produce():
        try:
            for event in stream:
                if abandoned.is_set():
                    break
                put(("event", event))
        except Exception as exc:  # noqa: BLE001 - handed to the async side
            put(("error", exc))
        finally:
            stream.close()
            put(("end", None))

    loop.run_in_executor(_executor, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        abandoned.set()


def _failure_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (ServingError, RemoteError)) else f"The model failed while answering: {type(exc).__name__}: {exc}"


def _chunk(meta, delta, finish_reason=None) -> str:
    payload = {
        "id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"], "model": meta["model"],
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "extra_json": {},
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens, "total_tokens": completion.total_tokens}


async def _sse(events, meta, include_usage):
    yield _chunk(meta, {"role": "assistant", "content": ""})
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Completion):
                    if event.tool_calls:
                        calls = [{"index": i, **call} for i, call in enumerate(event.tool_calls)]
                        yield _chunk(meta, {"tool_calls": calls})
                    yield _chunk(meta, {}, event.finish_reason)
                    if include_usage:
                        usage = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                                 "model": meta["model"], "choices": [], "usage": _usage(event), "extra_json": {}}
                        yield f"data: {json.dumps(usage)}\n\n"
                elif event:
                    yield _chunk(meta, {"content": event})
    except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
        log.exception("chat stream failed")
        yield f"data: {json.dumps(error_body(_failure_text(exc), status_code=500, code='model_error'))}\n\n"
    yield "data: [DONE]\n\n"


def _completion_object(completion: Completion, meta) -> dict:
    # OpenAI answers null, not "", when the model only called tools; SDKs test `content is None`.
    message = {"role": "assistant", "content": completion.content or (None if completion.tool_calls else "")}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return {
        "id": meta["id"], "object": "chat.completion", "created": meta["created"], "model": meta["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
        "usage": _usage(completion),
    }
