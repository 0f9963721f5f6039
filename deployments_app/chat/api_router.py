"""POST /v1/chat/completions: OpenAI/zhipuai chat, streamed as SSE or collected.

An async view (not DRF) because the answer must stream token by token under
ASGI. It checks who is calling, then hands the body to `protocol` and the
request to `serving`; their refusals become responses here.
"""

from asgiref.sync import sync_to_async
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from finetune_site import jsonbody, limits
from finetune_site.api_errors import ApiError, application_error_response, error_response
from finetune_site.apiviews import api_user_or_error, session_csrf_error
from finetune_site.errors import ApplicationError
from llm.serve.schema import Completion

from . import protocol, serving
from .streaming import Closable


@csrf_exempt
async def chat_completions(request):
    if request.method != "POST":
        return error_response("Use POST for chat completions.", status_code=405)
    user, error = await sync_to_async(api_user_or_error)(request)
    if error:
        return error
    # A call with an API key needs no CSRF check: skip the thread hop on the hot path.
    if "HTTP_AUTHORIZATION" not in request.META and (error := await sync_to_async(session_csrf_error)(request)):
        return error
    try:
        body = await jsonbody.aloads(request.body or b"null")
    except ValueError as exc:  # bad JSON, bad UTF-8, or an integer literal too long to read
        return error_response(f"The request body is not valid JSON: {exc}.")
    try:
        params = protocol.parse_chat_body(body)
    except ApiError as exc:
        return error_response(exc.message, status_code=exc.status_code, param=exc.param, code=exc.code)
    meta = protocol.answer_meta(params["model"])
    try:
        await sync_to_async(limits.admit_chat)(user, params["n"])  # each choice is a stream of its own
    except ApplicationError as exc:
        return application_error_response(exc)
    try:
        events = _Metered(await serving.open_events(user, params), user, streams=params["n"])
    except BaseException as exc:
        await sync_to_async(limits.finish_chat)(user, 0, params["n"])
        if isinstance(exc, ApplicationError):
            return application_error_response(exc)
        raise
    try:
        if params["stream"]:
            sse = serving.sse_events(
                events, meta, params["include_usage"], choices=params["n"], logprobs=params["logprobs"]
            )
            return _event_stream(sse, metered=events)
        completions = await serving.collect_choices(events)
    except ApplicationError as exc:
        return application_error_response(exc)
    return JsonResponse(protocol.completion_object(completions, meta))


class _Metered:
    """The answer's events; when they end or are closed, however that happens, the user's chat slot is
    given back and the tokens counted, once."""

    def __init__(self, events, user, *, streams: int = 1):
        self._events, self._user, self._streams = events, user, streams
        self._tokens, self._done = 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            event = await self._events.__anext__()
        except BaseException:  # the end (StopAsyncIteration), a failure or a cancellation
            await self.aclose()
            raise
        if isinstance(event, Completion):  # n choices: the prompt counts once, each choice's tokens apiece
            self._tokens += event.completion_tokens + (event.prompt_tokens if not self._tokens else 0)
        return event

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._events.aclose()
        finally:
            await sync_to_async(limits.finish_chat)(self._user, self._tokens, self._streams)


def _event_stream(events, *, metered: _Metered) -> StreamingHttpResponse:
    response = StreamingHttpResponse(Closable(events, also=metered), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # let each token through a buffering proxy at once
    return response
