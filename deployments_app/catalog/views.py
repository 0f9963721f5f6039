"""Model Square pages: base and fine-tuned models, their downloads, the merged-model build and delete."""

from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from evals_app.summaries import evaluation_of
from finetune_site import quotas
from finetune_site.middleware import refusals_go_to

from ..deployments.selectors import deployment_status_by_model
from ..models import ModelCard
from . import exports, selectors, services
from .resolution import base_models


@login_required
def model_list(request):
    bases = base_models()
    deployments = deployment_status_by_model(request.user)
    base_rows = [
        {"base": b, "size": quotas.folder_bytes(b.path) if b.ready else 0, "deployments": deployments.get(b.id, [])}
        for b in bases
    ]
    cards = selectors.model_square(request.user)
    for row in cards:
        row["auto_evaluation"] = evaluation_of(row["job"])
    return render(request, "models/list.html", {"bases": base_rows, "cards": cards})


def _card_or_404(request, model_id) -> ModelCard:
    card = ModelCard.objects.owned_by(request.user).filter(model_id=model_id).select_related("job").first()
    if card is None:
        raise Http404("No such model.")
    return card


def _zip_response(chunks, filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(exports.as_async(chunks), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}.zip"'
    return response


@login_required
def download_adapter(request, model_id):
    """The model's own files (a PEFT adapter for LoRA) with a README model card, zipped on the fly."""
    card = _card_or_404(request, model_id)
    name = exports.download_name(card, "adapter" if card.is_adapter else "model")
    readme = exports.model_readme(card, merged=False)
    return _zip_response(exports.zip_chunks(Path(card.path), prefix=name, extra={"README.md": readme}), name)


@login_required
def download_merged(request, model_id):
    card = _card_or_404(request, model_id)
    folder = exports.merged_folder(services.export_dir(card))
    if exports.merged_state(services.export_dir(card)) != "ready":
        messages.info(request, "The merged model is not built yet: press “Build merged model” first.")
        return redirect("model_list")
    name = exports.download_name(card, "merged")
    return _zip_response(exports.zip_chunks(folder, prefix=name), name)


@login_required
@require_POST
@refusals_go_to("model_list")
def model_merge(request, model_id):
    # A refusal (not a LoRA model) goes back to the page with its reason: ApplicationErrorMiddleware.
    state = services.model_merge_request(card=_card_or_404(request, model_id))
    messages.success(
        request,
        "The merged model is ready."
        if state == "ready"
        else "Building the merged model on a worker; its download appears here when ready.",
    )
    return redirect("model_list")


@login_required
@require_POST
@refusals_go_to("model_list")
def model_delete(request, model_id):
    services.model_delete(user=request.user, model_id=model_id)
    messages.success(request, f"Deleted {model_id}.")
    return redirect("model_list")
