"""Answering a parsed chat request: resolve its model, route it to a deployment or the shared pool, write the answer.

Refusals before the first token are domain errors (`finetune_site.errors`); the
view maps them to statuses. Once a stream has begun its status line is sent, so
a failure then travels in-band as the protocol's error event.
"""

import asyncio
import logging
from contextlib import aclosing

from asgiref.sync import sync_to_async

from finetune_site.errors import ApplicationError, Busy, InvalidInput, ModelFailed, NotFound, TimedOut, Unavailable
from finetune_site.store import StoreError
from llm.serve.errors import InvalidRequest, Overloaded, ServingError
from llm.serve.sampling import choice_seed
from llm.serve.schema import Completion, GenerationRequest, piece_logprobs

from ..catalog import resolve_model
from ..deployments.routing import deployment_events
from ..deployments.selectors import serving_deployment
from ..deployments.streams import RemoteError
from . import protocol, streaming
from .pool import get_pool

log = logging.getLogger(__name__)


async def open_events(user, params: dict):
    """Route a parsed chat request to the model's deployment or the shared pool.

    Returns an async iterator of text pieces ending with one Completion (with `n` > 1, each
    choice's pieces and Completion, marked with its index, in the order they come); raises
    an ApplicationError when the request is refused before generation starts.
    """
    resolved = await sync_to_async(resolve_model)(user, params["model"])
    if resolved is None:
        raise NotFound(
            f"The model {params['model']!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    generation_fields = {k: params[k] for k in protocol.GENERATION_FIELDS if k in params}
    deployment = await sync_to_async(serving_deployment)(user, params["model"])
    n = params.get("n") or 1
    if n == 1:
        return await _open_choice(resolved, deployment, generation_fields)
    # Each choice is an engine stream of its own; with a seed, each its own seed, so they differ reproducibly.
    seed = generation_fields.get("seed")
    opened = await asyncio.gather(
        *(_open_choice(resolved, deployment, {**generation_fields, "seed": choice_seed(seed, i)}) for i in range(n)),
        return_exceptions=True,
    )
    refusals = [result for result in opened if isinstance(result, BaseException)]
    if refusals:
        for result in opened:
            if not isinstance(result, BaseException):
                await result.aclose()
        raise refusals[0]
    return streaming.merge_choices(opened)


def _open_here(resolved, generation: GenerationRequest):
    """This process's pool's stream, once the model's files are here (the store may have to bring them)."""
    resolved.fetch()
    return get_pool().open_stream(generation)


async def _open_choice(resolved, deployment, generation_fields: dict):
    """One answer's events, from the deployment or the pool, its first event already there."""
    if deployment is not None:
        events = deployment_events(deployment, generation_fields)
        try:
            first = await anext(events)
        except RemoteError as exc:
            raise _refusal_of(exc) from exc
        return streaming.prepend(first, events)
    generation = GenerationRequest(
        base_path=str(resolved.base_path),
        adapter_path=str(resolved.adapter_path) if resolved.adapter_path else None,
        **generation_fields,
    )
    try:
        # Loading a model on first use blocks: a thread does it. The answer then comes from the engine's
        # own thread straight to this event loop, with no thread waiting per stream.
        stream = await streaming.run_in_thread(_open_here, resolved, generation)
        events = stream.events()
        first = await anext(events)
    except Overloaded as exc:
        raise Busy(str(exc), retry_after=exc.retry_after, code="engine_overloaded") from exc
    except InvalidRequest as exc:
        raise InvalidInput(str(exc), param=exc.param or "messages", code="invalid_request") from exc
    except ServingError as exc:
        raise ModelFailed(str(exc), code="model_error") from exc
    except StoreError as exc:
        raise Unavailable(str(exc), code="store_unavailable") from exc
    return streaming.prepend(first, events)


def _refusal_of(error: RemoteError) -> ApplicationError:
    """The domain error for an instance's answer that was an error (its status travels on the stream)."""
    if error.status == 400:
        return InvalidInput(str(error), param=getattr(error, "param", None) or "messages", code="invalid_request")
    if error.status == 429:  # the instance's engine stayed full
        retry_after = getattr(error, "retry_after", None) or 5
        return Busy(str(error), retry_after=retry_after, code="engine_overloaded")
    if error.status == 503:  # no instance took it
        return Unavailable(str(error), code="model_error")
    if error.status == 504:  # the instance that took it went quiet
        return TimedOut(str(error), code="model_error")
    return ModelFailed(str(error), code="model_error")


def failure_message(exc: Exception) -> str:
    """What the caller is told when the model fails mid-answer."""
    if isinstance(exc, ServingError | RemoteError):
        return str(exc)
    return f"The model failed while answering: {type(exc).__name__}: {exc}"


async def collect(events) -> Completion | None:
    """The whole answer (for a request without `stream`); a failure is a ModelFailed."""
    choices = await collect_choices(events)
    return choices[0] if choices else None


async def collect_choices(events) -> list[Completion]:
    """Every choice's Completion, by index (for a request without `stream`); a failure is a ModelFailed."""
    completions = []
    try:
        async with aclosing(events):  # a client that leaves cancels the view: stop generating too
            async for event in events:
                if isinstance(event, Completion):
                    completions.append(event)
    except Exception as exc:  # answered in the error shape, never a bare 500
        log.exception("chat completion failed")
        raise ModelFailed(failure_message(exc), code="model_error") from exc
    return sorted(completions, key=lambda completion: completion.index)


async def sse_events(events, meta, include_usage: bool, *, choices: int = 1, logprobs: bool = False):
    """The answer as server-sent `chat.completion.chunk` events, ending with [DONE].

    With n choices, each choice's chunks carry its index; the usage chunk comes once, after all of them.
    """
    for index in range(choices):
        yield protocol.chunk_event(meta, {"role": "assistant", "content": ""}, index=index)
    finished = []
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Completion):
                    finished.append(event)
                    if event.tool_calls:
                        calls = [{"index": i, **call} for i, call in enumerate(event.tool_calls)]
                        yield protocol.chunk_event(meta, {"tool_calls": calls}, index=event.index)
                    yield protocol.chunk_event(meta, {}, event.finish_reason, index=event.index)
                elif event or piece_logprobs(event):
                    yield protocol.piece_chunk_event(meta, event, logprobs=logprobs)
        if include_usage and finished:
            yield protocol.usage_event(meta, finished)
    except Exception as exc:  # the stream has begun: report in-band
        log.exception("chat stream failed")
        yield protocol.error_event(failure_message(exc))
    yield protocol.DONE_EVENT
