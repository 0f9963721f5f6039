from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from finetune_site.api_errors import ApiError

from . import exports, selectors, services
from .catalog import base_models
from .models import ModelCard


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@login_required
def model_list(request):
    bases = base_models()
    deployments = selectors.deployment_status_by_model(request.user)
    base_rows = [{"base": b, "size": _folder_size(b.path) if b.ready else 0, "deployments": deployments.get(b.id, [])} for b in bases]
    return render(request, "models/list.html", {"bases": base_rows, "cards": selectors.model_square(request.user)})


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
def model_merge(request, model_id):
    try:
        state = services.model_merge_request(card=_card_or_404(request, model_id))
    except ApiError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The merged model is ready." if state == "ready" else
                         "Building the merged model on a worker; its download appears here when ready.")
    return redirect("model_list")


@login_required
@require_POST
def model_delete(request, model_id):
    card = ModelCard.objects.owned_by(request.user).filter(model_id=model_id).first()
    if card is None:
        raise Http404("No such model.")
    services.model_card_delete(card=card)
    messages.success(request, f"Deleted {model_id}.")
    return redirect("model_list")


@login_required
def playground(request):
    bases = [b for b in base_models() if b.ready]
    cards = list(ModelCard.objects.owned_by(request.user))
    left = request.GET.get("a") or (cards[0].base_model if cards else (bases[0].id if bases else ""))
    right = request.GET.get("b") or (cards[0].model_id if cards else "")
    third = request.GET.get("c", "")
    choices = selectors.model_choices(request.user, [left, right, third])
    return render(request, "playground.html", {"choices": choices, "left": left, "right": right, "third": third})
