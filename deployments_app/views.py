from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from jobs_app.models import Checkpoint

from . import services
from .catalog import base_models
from .models import ModelCard


@login_required
def model_list(request):
    cards = ModelCard.objects.owned_by(request.user).select_related("job")
    return render(request, "models/list.html", {"bases": base_models(), "cards": cards})


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
    checkpoints = Checkpoint.objects.filter(job__owner=request.user).select_related("job__owner")[:50]
    choices = [b.id for b in bases] + [c.model_id for c in cards] + [c.model_id for c in checkpoints if c.model_id]
    left = request.GET.get("a") or (cards[0].base_model if cards else (bases[0].id if bases else ""))
    right = request.GET.get("b") or (cards[0].model_id if cards else "")
    return render(request, "playground.html", {"choices": choices, "left": left, "right": right})
