"""Model Square pages: base and fine-tuned models, their downloads, the merged and GGUF builds, and delete.

Downloads say their size (Content-Length) so browsers show progress: single files
(GGUF, Modelfile) are streamed with their size on disk, zips are stored (not deflated)
so their length is computed before the first byte is streamed.
"""

from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from evals_app.summaries import evaluation_of
from finetune_site import quotas
from finetune_site.middleware import refusals_go_to
from finetune_site.store import store
from llm.export import QUANTS

from ..deployments.selectors import deployment_status_by_model
from ..models import ModelCard
from . import exports, gguf_exports, selectors, services
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
        _add_exports(row)
    return render(request, "models/list.html", {"bases": base_rows, "cards": cards})


def _add_exports(row: dict) -> dict:
    """What the card's export block shows: the merged build's progress, each GGUF flavour."""
    card = row["card"]
    folder = services.export_dir(card)
    if "merged" not in row:
        row["merged"] = exports.merged_state(folder) if card.is_adapter else None
    row["merged_progress"] = exports.read_progress(folder, "merged") if row["merged"] == "building" else None
    row["gguf"] = gguf_exports.gguf_exports(card, folder) if card.is_adapter else []
    row["exports_building"] = row["merged"] == "building" or any(g["state"] == "building" for g in row["gguf"])
    return row


@login_required
@require_GET
def model_exports(request, model_id):
    """The card's export block alone: the page polls it while a build runs."""
    row = _add_exports({"card": _card_or_404(request, model_id)})
    return render(request, "models/_exports.html", {"row": row, "card": row["card"]})


def _card_or_404(request, model_id) -> ModelCard:
    card = ModelCard.objects.owned_by(request.user).filter(model_id=model_id).select_related("job").first()
    if card is None:
        raise Http404("No such model.")
    return card


def _zip_response(folder: Path, name: str, extra: dict[str, str] | None = None) -> StreamingHttpResponse:
    """The folder as name.zip, streamed, with its length when the stored zip's length can be known."""
    chunks = exports.zip_chunks(folder, prefix=name, extra=extra)
    response = StreamingHttpResponse(exports.as_async(chunks), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{name}.zip"'
    size = exports.zip_size(folder, prefix=name, extra=extra)
    if size is not None:
        response["Content-Length"] = str(size)
    return response


@login_required
def download_adapter(request, model_id):
    """The model's own files (a PEFT adapter for LoRA), made portable: our model card, the base named by its hub id."""
    card = _card_or_404(request, model_id)
    name = exports.download_name(card, "adapter" if card.is_adapter else "model")
    return _zip_response(store().fetch(card.path), name, exports.adapter_download_extras(card))


@login_required
def download_merged(request, model_id):
    card = _card_or_404(request, model_id)
    folder = exports.merged_folder(services.export_dir(card))
    if exports.merged_state(services.export_dir(card)) != "ready":
        messages.info(request, "The merged model is not built yet: press “Build merged model” first.")
        return redirect("model_list")
    return _zip_response(store().fetch(folder), exports.download_name(card, "merged"))


def _ready_gguf_folder(card, quant: str) -> Path | None:
    if quant not in QUANTS:
        raise Http404("No such GGUF flavour.")
    folder = services.export_dir(card)
    if gguf_exports.gguf_state(folder, quant) != "ready":
        return None
    return store().fetch(gguf_exports.gguf_folder(folder, quant))


@login_required
def download_gguf(request, model_id, quant):
    """The checked GGUF file itself, with its size, for llama.cpp or Ollama."""
    card = _card_or_404(request, model_id)
    folder = _ready_gguf_folder(card, quant)
    if folder is None:
        messages.info(request, f"The {quant} GGUF is not built yet: press “Build GGUF {quant}” first.")
        return redirect("model_list")
    name = gguf_exports.gguf_file_name(card, quant)
    return _file_response(folder / name, name, "application/octet-stream")


@login_required
def download_modelfile(request, model_id, quant):
    """The Ollama Modelfile that goes beside the GGUF file."""
    card = _card_or_404(request, model_id)
    folder = _ready_gguf_folder(card, quant)
    if folder is None:
        raise Http404("This GGUF export is not built yet.")
    return _file_response(folder / "Modelfile", "Modelfile", "text/plain; charset=utf-8")


def _file_response(path: Path, filename: str, content_type: str) -> StreamingHttpResponse:
    """One file as a download with its size, read a megabyte at a time.

    Not FileResponse: under ASGI Django reads a synchronous file iterator whole before sending it.
    """
    response = StreamingHttpResponse(exports.as_async(exports.file_chunks(path)), content_type=content_type)
    response["Content-Length"] = str(path.stat().st_size)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@login_required
@require_POST
@refusals_go_to("model_list")
def model_gguf(request, model_id, quant):
    state = services.gguf_export_request(card=_card_or_404(request, model_id), quant=quant)
    messages.success(
        request,
        f"The {quant} GGUF is ready."
        if state == "ready"
        else f"Building the {quant} GGUF on a worker (merge, write, check); its progress shows on the card.",
    )
    return redirect("model_list")


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
