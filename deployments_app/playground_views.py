"""Playground helpers: validation samples, the rendered chat template, and batch compare."""

import json
import random
from functools import lru_cache

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from finetune_site import jsonbody
from finetune_site.api_errors import ApiError, error_response
from finetune_site.apiviews import api_user_or_error
from jobs_app.selectors import checkpoint_for_model_id

from . import metrics
from .catalog import resolve_model
from .chat import ChatFailure, _session_csrf_error, open_events, parse_chat_body
from .models import ModelCard
from llm.chat import check_messages, check_tools
from llm.serve.errors import InvalidRequest, ServingError
from llm.serve.prompt import render_prompt
from llm.serve.schema import Completion

_MAX_LINES_SCANNED = 5000
MAX_BATCH = 50


def _job_of(user, model_id: str):
    card = ModelCard.objects.owned_by(user).filter(model_id=model_id).select_related("job").first()
    if card is not None:
        return card.job
    checkpoint = checkpoint_for_model_id(user, model_id)
    return checkpoint.job if checkpoint else None


def validation_examples(user, model_id: str, *, n: int, seed: int | None = None) -> list[dict]:
    """Up to n examples from the model's validation data (training data when it has none).

    Each is {"messages": the conversation up to the last answer, "reference": that answer}.
    """
    job = _job_of(user, model_id)
    if job is None:
        raise ApiError(f"{model_id} has no training data to sample from: pick a fine-tuned model or checkpoint.", param="model")
    dataset = job.validation_file or job.training_file
    source = dataset.normalized if dataset and dataset.normalized else (dataset.file if dataset else None)
    if not source:
        raise ApiError("The model's dataset is no longer available.", param="model")
    examples = []
    with source.open("rb") as lines:
        for number, line in enumerate(lines):
            if number >= _MAX_LINES_SCANNED:
                break
            example = _split(line)
            if example:
                examples.append(example)
    random.Random(seed).shuffle(examples)
    return examples[:n]


def _split(line: bytes) -> dict | None:
    try:
        messages = json.loads(line).get("messages") or []
    except (ValueError, AttributeError):
        return None
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
    if not last or not isinstance(messages[last].get("content"), str):
        return None
    return {"messages": messages[:last], "reference": messages[last]["content"]}


@login_required
@require_GET
def sample(request):
    """One validation example for the prompt box: system prompt, earlier turns, last user message, reference."""
    try:
        found = validation_examples(request.user, request.GET.get("model", ""), n=1, seed=random.randrange(2**31))
    except ApiError as exc:
        return error_response(exc.message, param=exc.param)
    if not found:
        return error_response("No usable examples in the model's data.", param="model")
    messages, reference = found[0]["messages"], found[0]["reference"]
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    turns = [m for m in messages if m.get("role") != "system"]
    prompt = turns[-1]["content"] if turns and turns[-1].get("role") == "user" else ""
    return JsonResponse({"system": system, "history": turns[:-1], "prompt": prompt, "reference": reference})


@lru_cache(maxsize=8)
def _tokenizer(base_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)


def render_chat_template(user, model_id: str, messages: list, tools: list | None = None) -> dict:
    """The exact prompt text the model receives for these messages, and its token count."""
    resolved = resolve_model(user, model_id)
    if resolved is None:
        raise ApiError(f"The model {model_id!r} does not exist or you do not have access to it.", status_code=404, param="model")
    problems = check_messages(messages) + check_tools(tools)
    if problems:
        raise ApiError("; ".join(problems), param="messages")
    tokenizer = _tokenizer(str(resolved.base_path))
    try:
        ids = render_prompt(tokenizer, messages, tools)
    except (InvalidRequest, ServingError) as exc:
        raise ApiError(str(exc), param="messages") from exc
    return {"model": model_id, "prompt": tokenizer.decode(ids), "prompt_tokens": len(ids)}


def _json_object(request) -> dict:
    """The request body as a JSON object; anything else (bad JSON, a list, a number) is a 400."""
    try:
        body = jsonbody.loads(request.body or b"{}")
    except ValueError as exc:
        raise ApiError(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    return body


def _model_id(body, name: str = "model", default: str = "") -> str:
    value = body.get(name) or default
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a model id string, got {value!r}.", param=name)
    return value


@login_required
@require_POST
def rendered_template(request):
    try:
        body = _json_object(request)
        return JsonResponse(render_chat_template(request.user, _model_id(body), body.get("messages") or [], body.get("tools")))
    except ApiError as exc:
        return error_response(exc.message, status_code=exc.status_code, param=exc.param)


@csrf_exempt
async def batch_compare(request):
    """Stream one JSON line per validation example with each model's answer and scores, then the totals."""
    if request.method != "POST":
        return error_response("Use POST.", status_code=405)
    user, error = await sync_to_async(api_user_or_error)(request)
    if error:
        return error
    if "HTTP_AUTHORIZATION" not in request.META and (error := await sync_to_async(_session_csrf_error)(request)):
        return error
    try:
        body = _json_object(request)
        listed = body.get("models")
        # Two panes may show the same model: one column, scored once per row.
        models = list(dict.fromkeys(m for m in listed if isinstance(m, str) and m)) if isinstance(listed, list) else []
        if not models:
            raise ApiError("models must list at least one model id.", param="models")
        n = body.get("n", 5)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
            raise ApiError(f"n must be a whole number from 1 to {MAX_BATCH}.", param="n")
        settings_ = parse_chat_body({**{k: body.get(k) for k in ("temperature", "top_p", "max_tokens", "seed")},
                                     "model": models[0], "messages": [{"role": "user", "content": "-"}]})
        source = _model_id(body, "source", default=models[-1])
        examples = await sync_to_async(validation_examples)(user, source, n=n, seed=settings_["seed"] or 0)
    except ApiError as exc:
        return error_response(exc.message, param=exc.param)
    system = body.get("system") or ""
    response = StreamingHttpResponse(_batch_rows(user, models, examples, settings_, system), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def _batch_rows(user, models, examples, settings_, system):
    totals = {m: {"exact_match": 0, "rouge_l": 0.0, "errors": 0} for m in models}
    yield json.dumps({"type": "start", "rows": len(examples), "models": models}) + "\n"
    for index, example in enumerate(examples):
        messages = example["messages"]
        if system:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        answers = {}
        for model in models:
            text, failure = await _answer(user, {**settings_, "model": model, "messages": messages})
            exact = failure is None and metrics.exact_match(text, example["reference"])
            score = metrics.rouge_l(text, example["reference"]) if failure is None else 0.0
            totals[model]["exact_match"] += int(exact)
            totals[model]["rouge_l"] += score
            totals[model]["errors"] += int(failure is not None)
            answers[model] = {"text": text, "error": failure, "exact_match": exact, "rouge_l": round(score, 4)}
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        yield json.dumps({"type": "row", "index": index, "prompt": prompt, "reference": example["reference"], "answers": answers}) + "\n"
    count = max(len(examples), 1)
    summary = {m: {"exact_match": t["exact_match"] / count, "rouge_l": round(t["rouge_l"] / count, 4), "errors": t["errors"]}
               for m, t in totals.items()}
    yield json.dumps({"type": "total", "rows": len(examples), "models": summary}) + "\n"


async def _answer(user, params) -> tuple[str, str | None]:
    try:
        events = await open_events(user, params)
        async for event in events:
            if isinstance(event, Completion):
                return event.content, None
    except ChatFailure as exc:
        return "", exc.message
    except Exception as exc:  # noqa: BLE001 - one failed row must not end the batch
        return "", f"{type(exc).__name__}: {exc}"
    return "", "the model returned no answer"
