"""Playground pages and their JSON endpoints: the page, a validation sample, the rendered template, batch compare.

Batch compare starts evaluation runs (`batch.py`); the page then polls its own URL with
`?batch=<eval id>` and gets the results partial while the runs go on.

The JSON endpoints answer in the API's error shape: a refusal of the view's own
(a body that is not a JSON object) as ApiError, a service's through
`application_error_response`.
"""

import random

from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from finetune_site import jsonbody
from finetune_site.api_errors import ApiError, application_error_response, error_response
from finetune_site.apiviews import api_user_or_error, session_csrf_error
from finetune_site.errors import ApplicationError

from ..catalog import base_models
from ..catalog.selectors import model_choices
from ..chat.protocol import parse_chat_body
from ..models import ModelCard
from .batch import MAX_BATCH, MAX_MODELS, batch_compare_create, batch_progress
from .selectors import render_chat_template, validation_examples


@login_required
def playground(request):
    batch_id = request.GET.get("batch", "")
    batch = batch_progress(request.user, batch_id) if batch_id else None
    if request.htmx and batch_id:  # the batch results polling themselves while the runs go on
        if batch is None:
            raise Http404("No such batch compare.")
        return render(request, "playground/_batch.html", {"batch": batch})
    bases = [b for b in base_models() if b.ready]
    cards = list(ModelCard.objects.owned_by(request.user))
    left = request.GET.get("a") or (cards[0].base_model if cards else (bases[0].id if bases else ""))
    right = request.GET.get("b") or (cards[0].model_id if cards else "")
    third = request.GET.get("c", "")
    choices = model_choices(request.user, [left, right, third])
    context = {"choices": choices, "left": left, "right": right, "third": third, "batch": batch}
    return render(request, "playground.html", context)


@login_required
@require_GET
def sample(request):
    """One validation example for the prompt box: system prompt, earlier turns, last user message, reference."""
    try:
        found = validation_examples(request.user, request.GET.get("model", ""), n=1, seed=random.randrange(2**31))
    except ApplicationError as exc:
        return application_error_response(exc)
    if not found:
        return error_response("No usable examples in the model's data.", param="model")
    messages, reference = found[0]["messages"], found[0]["reference"]
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    turns = [m for m in messages if m.get("role") != "system"]
    prompt = turns[-1]["content"] if turns and turns[-1].get("role") == "user" else ""
    return JsonResponse({"system": system, "history": turns[:-1], "prompt": prompt, "reference": reference})


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


def _refused(exc: ApiError | ApplicationError) -> JsonResponse:
    if isinstance(exc, ApplicationError):
        return application_error_response(exc)
    return error_response(exc.message, status_code=exc.status_code, param=exc.param, code=exc.code)


@login_required
@require_POST
def rendered_template(request):
    try:
        body = _json_object(request)
        return JsonResponse(
            render_chat_template(request.user, _model_id(body), body.get("messages") or [], body.get("tools"))
        )
    except (ApiError, ApplicationError) as exc:
        return _refused(exc)


@csrf_exempt
def batch_compare(request):
    """Start a batch compare: an evaluation run per model over sampled validation examples, on the worker."""
    if request.method != "POST":
        return error_response("Use POST.", status_code=405)
    user, error = api_user_or_error(request)
    if error:
        return error
    if error := session_csrf_error(request):
        return error
    try:
        body = _json_object(request)
        listed = body.get("models")
        # Two panes may show the same model: one run, one column.
        models = list(dict.fromkeys(m for m in listed if isinstance(m, str) and m)) if isinstance(listed, list) else []
        if not models:
            raise ApiError("models must list at least one model id.", param="models")
        if len(models) > MAX_MODELS:
            raise ApiError(f"models may list at most {MAX_MODELS} model ids, got {len(models)}.", param="models")
        n = body.get("n", 5)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
            raise ApiError(f"n must be a whole number from 1 to {MAX_BATCH}.", param="n")
        chat = parse_chat_body(
            {
                **{k: body.get(k) for k in ("temperature", "top_p", "max_tokens", "seed")},
                "model": models[0],
                "messages": [{"role": "user", "content": "-"}],
            }
        )
        system = body.get("system") or ""
        if not isinstance(system, str):
            raise ApiError("system must be a string: the system prompt every example is sent with.", param="system")
        source = _model_id(body, "source", default=models[-1])
        examples = validation_examples(user, source, n=n, seed=chat["seed"] or 0)
        sampling = {
            "temperature": chat["temperature"],
            "top_p": chat["top_p"],
            "max_completion_tokens": chat["max_tokens"],
            **({"seed": chat["seed"]} if chat["seed"] is not None else {}),
        }
        evaluation = batch_compare_create(user=user, models=models, examples=examples, sampling=sampling, system=system)
    except (ApiError, ApplicationError) as exc:
        return _refused(exc)
    return JsonResponse(
        {
            "id": evaluation.public_id,
            "runs": [{"id": r.public_id, "model": r.model, "status": r.status} for r in evaluation.runs.order_by("id")],
            "progress_url": f"{reverse('playground')}?batch={evaluation.public_id}",
            "eval_url": reverse("eval_detail", args=[evaluation.public_id]),
        },
        status=201,
    )
