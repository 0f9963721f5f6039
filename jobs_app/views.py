"""The job pages: list, create form with live estimates, detail, downloads, compare, and the control buttons."""

import csv
import io

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Q
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from datasets_app.selectors import dataset_for
from datasets_app.selectors import ready_datasets_for as ready_datasets
from deployments_app.models import ModelCard
from evals_app.summaries import evaluation_of
from finetune_site.errors import ApplicationError

from . import selectors, services, trackers
from .estimates import estimate_job
from .forms import JobForm
from .hyperparameters import METHODS, check_hyperparameters, described_settings
from .models import FineTuningJob
from .objectives import kind_words, objective_of

SORTS = {"newest": "-id", "oldest": "id", "status": "status", "model": "base_model"}


@login_required
def job_list(request):
    jobs = selectors.jobs_for(request.user)
    status, query, sort = (
        request.GET.get("status", ""),
        request.GET.get("q", "").strip(),
        request.GET.get("sort", "newest"),
    )
    if status:
        jobs = jobs.filter(status=status)
    if query:
        jobs = jobs.filter(
            Q(public_id__icontains=query)
            | Q(suffix__icontains=query)
            | Q(base_model__icontains=query)
            | Q(fine_tuned_model__icontains=query)
            | Q(training_file_ref__icontains=query)
        )
    jobs = list(jobs.order_by(SORTS.get(sort, "-id"))[:200])
    selectors.annotate_queue_positions(jobs)
    context = {
        "jobs": jobs,
        "status": status,
        "q": query,
        "sort": sort,
        "sorts": SORTS,
        "statuses": [s for s, _ in FineTuningJob.STATUS_CHOICES],
    }
    return render(request, "jobs/list.html", context)


def _initial(request) -> dict:
    like = request.GET.get("like")
    job = selectors.job_for(request.user, like) if like else None
    if job is not None:
        return JobForm.initial_from_job(job)
    initial = {key: request.GET[key] for key in ("model", "training_file") if request.GET.get(key)}
    if initial.get("model", "").startswith("ft:"):
        # "Fine-tune" on a fine-tuned model's card: train on from it, with the method its weights need.
        card = ModelCard.objects.owned_by(request.user).filter(model_id=initial["model"]).first()
        if card is None:
            del initial["model"]
        else:
            initial["method"] = card.method
    return initial


@login_required
def job_create(request):
    form = JobForm(request.POST or None, user=request.user, initial=_initial(request))
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = services.job_create(
                owner=request.user,
                model=data["model"],
                training_file=data["training_file"],
                validation_file=data["validation_file"] or None,
                method=data["method"],
                objective=data["objective"] or None,
                hyperparameters=form.hyperparameters(),
                suffix=data["suffix"],
                seed=data["seed"],
                holdout_percent=data["holdout_percent"] or 0,
                report_to=data["report_to"],
            )
        except ApplicationError as exc:  # shown at the field it names, with everything typed kept
            form.add_error(_form_field(form, exc.param), exc.message)
        else:
            messages.success(request, f"Job {job.public_id} queued.")
            return redirect("job_detail", public_id=job.public_id)
    return render(request, "jobs/create.html", {"form": form, "estimate": _estimate(form, request.user)})


def _form_field(form: JobForm, param: str | None) -> str | None:
    """The form field an API param names: training_type is the form's method, hyperparameters.beta its beta."""
    name = {"training_type": "method"}.get(param or "", (param or "").removeprefix("hyperparameters."))
    return name if name in form.fields else None


def _estimate(form: JobForm, user) -> dict | None:
    """Estimates for whatever the form holds now (bound or initial), or None."""

    values = form.data if form.is_bound else {**{k: f.initial for k, f in form.fields.items()}, **form.initial}
    dataset = dataset_for(user, values.get("training_file") or "") or next(iter(ready_datasets(user)), None)
    if dataset is None or not dataset.is_ready:
        return None
    requested = {}
    for name in form.hyperparameter_names:
        raw = values.get(name)
        if raw in (None, ""):
            continue
        try:
            requested[name] = form.fields[name].clean(raw)
        except ValidationError:
            return None
    try:
        requested = check_hyperparameters(requested)
    except ApplicationError:
        return None
    objective = objective_of(dataset)
    if objective is None:
        return {"dataset": dataset, "refused": f"{dataset.filename} holds {kind_words(dataset)}: not trainable yet."}
    method = values.get("method") or "lora"
    model = values.get("model") or (form.fields["model"].choices[0][0] if form.fields["model"].choices else "")
    if model.startswith("ft:"):  # a fine-tuned model trains at the speed of its base
        card = ModelCard.objects.owned_by(user).filter(model_id=model).first()
        model = card.base_model if card else model
    return {
        "dataset": dataset,
        **estimate_job(
            dataset=dataset,
            base_model=model,
            method=method if method in METHODS else "lora",
            objective=objective,
            requested=requested,
        ),
    }


@login_required
def job_estimate(request):
    form = JobForm(request.POST or None, user=request.user)
    return render(request, "jobs/_estimate.html", {"estimate": _estimate(form, request.user)})


def _owned(request, public_id) -> FineTuningJob:
    job = selectors.job_for(request.user, public_id)
    if job is None:
        raise Http404("No such job.")
    return job


@login_required
def job_detail(request, public_id):
    job = _owned(request, public_id)
    points = selectors.metric_points(job)
    context = {
        "job": job,
        "events": selectors.message_events(job),
        "checkpoints": job.checkpoints.all(),
        "figures": selectors.job_figures(points, job.objective),
        "chart_panels": selectors.chart_panels(job.objective),
        "warnings": selectors.warnings_of(job),
        "evaluation": evaluation_of(job),
        "last_step": max((p["step"] for p in points), default=0),
        "queue_position": selectors.queue_position(job),
        "settings": described_settings(job.resolved, validation=selectors.has_validation(job)),
        "trackers": trackers.described(job.tracking or {}, job.trackers, started=job.started_at is not None),
    }
    return render(request, "jobs/detail.html", context)


@login_required
def job_events(request, public_id):
    job = _owned(request, public_id)
    return render(request, "jobs/_events.html", {"events": selectors.message_events(job)})


@login_required
def job_metrics_csv(request, public_id):
    job = _owned(request, public_id)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(selectors.metrics_csv_rows(job))
    response = HttpResponse(buffer.getvalue(), content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{job.public_id}-metrics.csv"'
    return response


@login_required
def job_log(request, public_id):
    job = _owned(request, public_id)
    lines = [
        f"{e.created_at:%Y-%m-%d %H:%M:%S} [{e.level}] {e.message}"
        for e in job.events.filter(type="message").order_by("id")
    ]
    response = HttpResponse("\n".join(lines) + "\n", content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{job.public_id}-log.txt"'
    return response


@login_required
def job_compare(request):
    ids = [i for i in request.GET.getlist("ids") if i] or [i for i in request.GET.get("id", "").split(",") if i]
    jobs = [job for job in (selectors.job_for(request.user, i) for i in ids) if job is not None]
    context = {"jobs": jobs, "all_jobs": selectors.jobs_for(request.user)[:100], "selected": ids}
    if len(jobs) >= 2:
        context["figure"] = selectors.compare_figure(jobs)
        context["diff"] = selectors.settings_diff(jobs)
    return render(request, "jobs/compare.html", context)


def _control(action):
    # A refusal (cancel a finished job) comes back to the job page as a message, through the middleware.
    @login_required
    @require_POST
    def view(request, public_id):
        action(job=_owned(request, public_id))
        return redirect("job_detail", public_id=public_id)

    return view


job_cancel = _control(services.job_cancel)
job_pause = _control(services.job_pause)
job_resume = _control(services.job_resume)
job_retry = _control(services.job_retry)
