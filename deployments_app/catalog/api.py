"""Models API: list, retrieve and delete base and fine-tuned models."""

from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.ids import unix
from finetune_site.openapi import errors

from ..models import ModelCard
from . import services
from .api_schema import MODEL, FineTunedModelDeleted, ModelDeleted, ModelObject, Models
from .resolution import base_models, get_base_model


def base_model_object(base) -> dict:
    return {"id": base.id, "object": "model", "created": 0, "owned_by": base.owned_by, "ready": base.ready}


def card_object(card: ModelCard) -> dict:
    return {
        "id": card.model_id,
        "object": "model",
        "created": unix(card.created_at),
        "owned_by": card.owner.username,
        "parent": card.base_model,
        "training_type": card.method,
    }


class ModelList(APIView):
    @extend_schema(
        operation_id="listModels", summary="The base models and your fine-tuned models", responses={200: Models}
    )
    def get(self, request):
        data = [base_model_object(b) for b in base_models()]
        data += [card_object(c) for c in ModelCard.objects.owned_by(request.user).select_related("owner")]
        return Response({"object": "list", "data": data})


@extend_schema(parameters=[MODEL])
class ModelDetail(APIView):
    @extend_schema(operation_id="retrieveModel", summary="A model", responses={200: ModelObject, **errors(404)})
    def get(self, request, model):
        base = get_base_model(model)
        if base is not None:
            return Response(base_model_object(base))
        return Response(card_object(services.model_card_of(request.user, model)))

    @extend_schema(
        operation_id="deleteModel",
        summary="Delete a fine-tuned model (its deployments are cancelled first)",
        responses={200: ModelDeleted, **errors(400, 403, 404)},
    )
    def delete(self, request, model):
        services.model_delete(user=request.user, model_id=model)
        return Response({"id": model, "object": "model", "deleted": True})


class FineTunedModelDelete(APIView):
    """zhipuai's fine_tuning.models.delete; the extra fields let the openai shape parse too."""

    @extend_schema(
        operation_id="deleteFineTunedModel",
        summary="zhipuai's delete of a fine-tuned model",
        parameters=[MODEL],
        responses={200: FineTunedModelDeleted, **errors(400, 404)},
    )
    def delete(self, request, model):
        services.model_card_delete(card=services.model_card_of(request.user, model))
        return Response(
            {
                "request_id": None,
                "model_name": model,
                "delete_status": "deleted",
                "id": model,
                "object": "model",
                "deleted": True,
            }
        )
