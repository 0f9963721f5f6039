from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from finetune_site.api_errors import ApiError

from . import selectors, services
from .forms import JobForm
from .models import FineTuningJob


@login_required
def job_list(request):
    jobs = selectors.jobs_for(request.user)
    status = request.GET.get("status", "")
    if status:
        jobs = jobs.filter(status=status)
    return render(request, "jobs/list.html", {"jobs": jobs[:200], "status": status, "statuses": [s for s, _ in FineTuningJob.STATUS_CHOICES]})


@login_required
def job_create(request):
    form = JobForm(request.POST or None, user=request.user, initial={"model": request.GET.get("model")})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = services.job_create(
                owner=request.user,
                model=data["model"],
                training_file=data["training_file"],
                validation_file=data["validation_file"] or None,
                method=data["method"],
                hyperparameters=form.hyperparameters(),
                suffix=data["suffix"],
                seed=data["seed"],
            )
        except ApiError as exc:
            form.add_error(exc.param if exc.param in form.fields else None, exc.message)
        else:
            messages.success(request, f"Job {job.public_id} queued.")
            return redirect("job_detail", public_id=job.public_id)
    return render(request, "jobs/create.html", {"form": form})


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
        "figure": selectors.loss_figure(points),
        "last_step": max((p["step"] for p in points), default=0),
        "queue_position": selectors.queue_position(job),
    }
    return render(request, "jobs/detail.html", context)


@login_required
def job_events(request, public_id):
    job = _owned(request, public_id)
    return render(request, "jobs/_events.html", {"events": selectors.message_events(job)})


def _control(action):
    @login_required
    @require_POST
    def view(request, public_id):
        job = _owned(request, public_id)
        try:
            action(job=job)
        except ApiError as exc:
            messages.error(request, exc.message)
        return redirect("job_detail", public_id=public_id)

    return view


job_cancel = _control(services.job_cancel)
job_pause = _control(services.job_pause)
job_resume = _control(services.job_resume)
