from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from finetune_site.api_errors import ApiError

from . import selectors, services
from .models import Dataset


@login_required
def dataset_list(request):
    datasets = list(selectors.datasets_for(request.user)[:200])
    context = {"datasets": datasets, "validating": any(d.status == Dataset.UPLOADED for d in datasets)}
    if request.htmx:
        return render(request, "datasets/_table.html", context)
    return render(request, "datasets/list.html", context)


@login_required
@require_POST
def dataset_upload(request):
    try:
        dataset = services.dataset_create(owner=request.user, upload=request.FILES.get("file"))
    except ApiError as exc:
        messages.error(request, exc.message)
        return redirect("dataset_list")
    messages.success(request, f"Uploaded {dataset.filename}; validating it now.")
    return redirect("dataset_list")


def _owned(request, public_id) -> Dataset:
    dataset = selectors.dataset_for(request.user, public_id)
    if dataset is None:
        raise Http404("No such dataset.")
    return dataset


@login_required
def dataset_detail(request, public_id):
    dataset = _owned(request, public_id)
    report = dataset.report or {}
    return render(request, "datasets/detail.html", {"dataset": dataset, "report": report})


@login_required
@require_POST
def dataset_delete(request, public_id):
    dataset = _owned(request, public_id)
    try:
        services.dataset_delete(dataset=dataset)
    except ApiError as exc:
        messages.error(request, exc.message)
        return redirect("dataset_detail", public_id=public_id)
    messages.success(request, f"Deleted {dataset.filename}.")
    return redirect("dataset_list")
