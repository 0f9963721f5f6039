"""Deployment pages: list with the create form, detail with instances, scale and cancel."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from finetune_site.errors import ApplicationError
from llm.serve.vllm import BACKENDS

from ..catalog.selectors import model_choices
from . import selectors, services


def _form_int(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default if value in (None, "") else value


@login_required
def deployment_list(request):
    form = {"model": request.GET.get("model", ""), "instances": 1, "max_concurrent_requests": 16, "backend": ""}
    error = None
    if request.method == "POST":
        form = {
            "model": request.POST.get("model", ""),
            "instances": _form_int(request.POST.get("instances"), 1),
            "max_concurrent_requests": _form_int(request.POST.get("max_concurrent_requests"), 16),
            "backend": request.POST.get("backend", ""),
        }
        try:
            deployment = services.deployment_create(
                user=request.user,
                model_id=form["model"],
                instances=form["instances"],
                max_concurrent_requests=form["max_concurrent_requests"],
                backend=form["backend"],
            )
        except ApplicationError as exc:  # shown beside the form, which keeps what was typed
            error = exc
        else:
            return redirect("deployment_detail", deployment.public_id)
    deployments = list(selectors.deployments_for(request.user).prefetch_related("instance_set")[:100])
    for deployment in deployments:
        deployment.usage = selectors.deployment_usage(deployment, list(deployment.instance_set.all()))
    return render(
        request,
        "deployments/list.html",
        {
            "deployments": deployments,
            "choices": model_choices(request.user, [form["model"]]),
            "form": form,
            "error": error,
            "backends": BACKENDS,
            "default_backend": settings.FT_SERVING_BACKEND,
        },
        status=400 if error else 200,
    )


def _deployment_or_404(request, deployment_id):
    deployment = selectors.deployment_for(request.user, deployment_id)
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


@login_required
def deployment_detail(request, deployment_id):
    deployment = _deployment_or_404(request, deployment_id)
    instances = list(deployment.instance_set.all())
    context = {
        "deployment": deployment,
        "instances": instances,
        "usage": selectors.deployment_usage(deployment, instances),
    }
    template = "deployments/_instances.html" if request.htmx else "deployments/detail.html"
    return render(request, template, context)


@login_required
@require_POST
def deployment_scale(request, deployment_id):
    deployment = _deployment_or_404(request, deployment_id)
    # A refusal (a bad count, no capacity) goes back to the page with its reason: ApplicationErrorMiddleware.
    services.deployment_scale(deployment=deployment, instances=_form_int(request.POST.get("instances"), 0))
    messages.success(request, f"Scaling to {deployment.instances} instance(s).")
    return redirect("deployment_detail", deployment.public_id)


@login_required
@require_POST
def deployment_cancel(request, deployment_id):
    deployment = services.deployment_cancel(deployment=_deployment_or_404(request, deployment_id))
    messages.success(
        request,
        f"Cancelled {deployment.public_id}: answers still running end as cancelled and its instance processes stop.",
    )
    return redirect("deployment_detail", deployment.public_id)
