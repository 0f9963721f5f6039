from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from deployments_app.catalog import tokenizer_path
from finetune_site.errors import ApplicationError

from . import selectors, services
from .models import Dataset
from .preview import load_tokenizer, preview_page


@login_required
def dataset_list(request):
    datasets = list(selectors.datasets_for(request.user)[:200])
    context = {"datasets": datasets, "validating": any(d.status == Dataset.UPLOADED for d in datasets)}
    if request.htmx:
        return render(request, "datasets/_table.html", context)
    return render(request, "datasets/list.html", {**context, "max_upload_bytes": settings.FT_MAX_UPLOAD_BYTES})


@login_required
@require_POST
def dataset_upload(request):
    try:
        dataset = services.dataset_create(owner=request.user, upload=request.FILES.get("file"))
    except ApplicationError as exc:  # the upload script reads the outcome from the messages, not a redirect
        messages.error(request, exc.message)
    else:
        messages.success(
            request,
            f"Uploaded {dataset.filename}. Every line is checked in the background; "
            "its status below changes by itself.",
        )
    if request.headers.get("X-Upload-Progress"):
        # Sent by the page's script (static/js/upload.js), which shows progress and then
        # goes where it is told; a redirect would be followed inside the request, and
        # the message read there, out of sight.
        return JsonResponse({"location": reverse("dataset_list")})
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
    tokens = report.get("tokens")
    context = {
        "dataset": dataset,
        "report": report,
        "tokens": tokens,
        "histogram": selectors.token_histogram_figure(tokens),
        "stats_pending": dataset.is_ready and tokens is None,
    }
    if request.htmx and request.GET.get("part") == "tokens":
        return render(request, "datasets/_tokens.html", context)
    return render(request, "datasets/detail.html", context)


PREVIEW_PAGE_SIZE = 10


@login_required
def dataset_preview(request, public_id):
    dataset = _owned(request, public_id)
    if not dataset.is_ready:
        if dataset.status == Dataset.ERROR:
            messages.error(request, "This file has problems, so there is no preview: they are listed below, by line.")
        else:
            messages.error(request, "The preview is available once every line is checked; this page updates by itself.")
        return redirect("dataset_detail", public_id=public_id)
    pages = max(1, -(-(dataset.examples or 0) // PREVIEW_PAGE_SIZE))
    try:
        page = min(max(1, int(request.GET.get("page", 1))), pages)  # past the end: the last page
    except ValueError:
        page = 1
    folder = tokenizer_path()
    tokenizer = load_tokenizer(str(folder)) if folder else None
    with dataset.file.open("rb") as original, dataset.normalized.open("rb") as normalized:
        items = preview_page(original, normalized, page=page, per_page=PREVIEW_PAGE_SIZE, tokenizer=tokenizer)
    return render(request, "datasets/preview.html", {"dataset": dataset, "items": items, "page": page, "pages": pages})


@login_required
@require_POST
def dataset_split(request, public_id):
    dataset = _owned(request, public_id)
    created = services.dataset_split(dataset=dataset, **services.split_options(request.POST))
    messages.success(
        request,
        "Creating " + ", ".join(d.filename for d in created) + " in the background; the original is unchanged.",
    )
    return redirect("dataset_list")


@login_required
@require_POST
def dataset_dedupe(request, public_id):
    dataset = _owned(request, public_id)
    created = services.dataset_dedupe(dataset=dataset)
    messages.success(
        request, f"Creating {created.filename} without duplicates in the background; the original is unchanged."
    )
    return redirect("dataset_list")


@login_required
@require_POST
def dataset_delete(request, public_id):
    dataset = _owned(request, public_id)
    services.dataset_delete(dataset=dataset)
    messages.success(request, f"Deleted {dataset.filename}.")
    return redirect("dataset_list")
