"""The models API's schema: documentation only, each shape mirroring the function in api.py that writes it."""

from rest_framework import serializers

from finetune_site.openapi import Choice, Const, list_of, path_parameter
from llm.train.config import METHODS

MODEL = path_parameter(
    "model", "A base, fine-tuned or checkpoint model id; it may hold `/` and `:` (sent raw or as `%2F`)."
)


class ModelObject(serializers.Serializer):
    """A base model (`base_model_object`: with `ready`) or one of your fine-tuned models (`card_object`: with
    `parent` and `training_type`)."""

    id = serializers.CharField()
    object = Const("model")
    created = serializers.IntegerField(help_text="Unix seconds; 0 for base models.")
    owned_by = serializers.CharField(help_text='"system" for base models, else the owner\'s user name.')
    ready = serializers.BooleanField(required=False, help_text="Base models: whether its weights are in place.")
    parent = serializers.CharField(required=False, help_text="Fine-tuned models: the base model it was trained on.")
    training_type = Choice(METHODS, required=False, help_text="Fine-tuned models: how it was trained.")


class ModelDeleted(serializers.Serializer):
    id = serializers.CharField()
    object = Const("model")
    deleted = serializers.BooleanField()


class FineTunedModelDeleted(serializers.Serializer):
    """zhipuai's answer (`request_id`, `model_name`, `delete_status`) with openai's fields, so both SDKs parse it."""

    request_id = serializers.CharField(allow_null=True)
    model_name = serializers.CharField()
    delete_status = Const("deleted")
    id = serializers.CharField()
    object = Const("model")
    deleted = serializers.BooleanField()


Models = list_of(ModelObject, "ModelList")
