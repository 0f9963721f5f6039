"""The evaluation pages: the list with the "New evaluation" form, the comparison page and its live totals,
the cancel and resume buttons, and the CSV and JSONL exports. They read stored rows; workers do the scoring."""

import json
from collections.abc import Iterator
from itertools import islice

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from datasets_app.selectors import dataset_for
from finetune_site.errors import ApplicationError
from llm.evals.graders import default_criteria

from . import items as run_items
from . import pages, selectors, services
from .forms import EvalForm
from .models import Eval


@login_required
def eval_list(request):
    form = EvalForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        evaluation = _start(request.user, form)
        if evaluation is not None:
            messages.success(request, f"Evaluation {evaluation.public_id} queued.")
            return redirect("eval_detail", eval_id=evaluation.public_id)
    return render(request, "evals/list.html", {"form": form, "evals": pages.eval_summaries(request.user)})


def _start(user, form: EvalForm) -> Eval | None:
    """Create the eval and one run per model, all or nothing; a refusal goes beside the field it names."""
    data = form.cleaned_data
    source = {"type": "file_id", "id": data["dataset"]}
    try:
        examples = pages.dataset_items(user, data["dataset"], limit=data["max_examples"])
        criteria = form.chosen_criteria()
        if criteria is None:
            criteria = default_criteria(examples)
        sampling = {"max_completion_tokens": run_items.answer_budget(examples)}
        with transaction.atomic():
            evaluation = services.eval_create(
                owner=user,
                name=data["name"] or _default_name(user, data),
                data_source_config={"type": "chat"},
                testing_criteria=criteria,
            )
            for model in data["models"]:
                services.run_create(
                    evaluation=evaluation,
                    data_source={"type": "completions", "model": model, "source": source, "sampling_params": sampling},
                    limit=data["max_examples"],
                    examples=examples,
                )
    except ApplicationError as exc:
        where = f" ({exc.param})" if exc.param and exc.param not in exc.message else ""
        form.add_error(form.field_for(exc.param), exc.message + where)
        return None
    return evaluation


def _default_name(user, data) -> str:
    dataset = dataset_for(user, data["dataset"])
    return f"{dataset.filename if dataset else data['dataset']}: {' vs '.join(data['models'])}"[:200]


def _owned(request, eval_id) -> Eval:
    evaluation = selectors.eval_for(request.user, eval_id)
    if evaluation is None:
        raise Http404("No such evaluation.")
    return evaluation


@login_required
def eval_detail(request, eval_id):
    evaluation = _owned(request, eval_id)
    runs = pages.runs_of(evaluation)
    context = {
        "evaluation": evaluation,
        "criteria_json": json.dumps(evaluation.testing_criteria, indent=2, ensure_ascii=False),
        "runs": runs,
        **pages.run_totals(evaluation, runs),
        **pages.example_page(runs, request.GET),
        "filters": pages.FILTERS,
    }
    return render(request, "evals/detail.html", context)


@login_required
def eval_progress(request, eval_id):
    """The totals partial the comparison page polls while a run is active."""
    evaluation = _owned(request, eval_id)
    context = pages.run_totals(evaluation, pages.runs_of(evaluation))
    response = render(request, "evals/_totals.html", {"evaluation": evaluation, **context})
    if request.htmx and not context["active"]:
        response["HX-Refresh"] = "true"  # the runs just finished: reload once, for their rows
    return response


def _run_action(action):
    # A refusal (resume a completed run) comes back to the comparison page as a message.
    @login_required
    @require_POST
    def view(request, eval_id, run_id):
        run = selectors.run_for(_owned(request, eval_id), run_id)
        if run is None:
            raise Http404("No such run.")
        try:
            action(run=run)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        return redirect("eval_detail", eval_id=eval_id)

    return view


eval_run_cancel = _run_action(services.run_cancel)
eval_run_resume = _run_action(services.run_resume)


async def _streamed(lines: Iterator[str], batch: int = 500):
    """Serve a generator that reads the database under ASGI a batch of lines at a time (Django would buffer
    it all). Thread-sensitive: every batch runs on the request's one database thread."""
    take = sync_to_async(lambda: "".join(islice(lines, batch)), thread_sensitive=True)
    while chunk := await take():
        yield chunk


def _export(lines, content_type: str, extension: str):
    @login_required
    def view(request, eval_id):
        evaluation = _owned(request, eval_id)
        response = StreamingHttpResponse(_streamed(lines(evaluation)), content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{evaluation.public_id}.{extension}"'
        return response

    return view


eval_export_csv = _export(pages.csv_lines, "text/csv; charset=utf-8", "csv")
eval_export_jsonl = _export(pages.jsonl_lines, "application/x-ndjson; charset=utf-8", "jsonl")
