"""The Django side of the hyperparameter definitions (`llm.train.hyperparameters`).

The definitions say what each hyperparameter is; this module turns them into what
the web needs: domain errors for refusals, form fields, the API schema's
description, and the words the job pages use for each resolved setting.
"""

from django import forms
from django.core.exceptions import ValidationError
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from finetune_site.errors import InvalidInput
from llm.train.config import METHODS
from llm.train.hyperparameters import HYPERPARAMETERS, Hyperparameter, check, resolve

__all__ = [
    "HOLDOUT_PERCENT",
    "METHODS",
    "DefinedValue",
    "HyperparametersField",
    "MethodField",
    "check_hyperparameters",
    "described_settings",
    "form_field",
    "public_hyperparameters",
    "resolve_hyperparameters",
]

HOLDOUT_PERCENT = Hyperparameter(
    name="holdout_percent",
    label="Or hold out % for validation",
    doc="Share of the training file split off as validation data, when no validation file is given; 0 splits nothing.",
    type=int,
    default=0,
    minimum=0,
    maximum=50,
    accepts_auto=False,
)
"""A job setting, not a training one: the split happens before the engine starts, so it lives here."""


def check_hyperparameters(raw: object, *, param_prefix: str = "hyperparameters") -> dict:
    """Return the requested values with types checked; raise InvalidInput naming the first bad one."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput("hyperparameters must be an object.", param=param_prefix)
    cleaned, problems = check(raw)
    if problems:
        raise InvalidInput(problems[0].message, param=f"{param_prefix}.{problems[0].name}")
    return cleaned


def resolve_hyperparameters(requested: dict, *, method: str, examples: int, objective: str = "sft") -> dict:
    """Fill every "auto" from the method, the objective and the size of the training set."""
    return resolve(requested, method=method, examples=examples, objective=objective)


def public_hyperparameters(resolved: dict, requested: dict, *, objective: str = "sft") -> dict:
    """The `hyperparameters` object of the API: numbers once known, else what was asked."""
    source = resolved or requested
    public = {
        "n_epochs": source.get("n_epochs", "auto"),
        "batch_size": source.get("batch_size", "auto"),
        "learning_rate_multiplier": source.get("learning_rate_multiplier", "auto"),
    }
    if objective == "dpo":
        public["beta"] = source.get("beta", "auto")
    return public


# --- The create form -------------------------------------------------------------


def form_field(definition: Hyperparameter) -> forms.Field:
    """A blank-means-auto form field that refuses with the same sentence as the API."""

    def validate(value):
        message = definition.public_problem(value)
        if message is not None:
            raise ValidationError(message, code="refused")  # not "invalid": Django would swap in its own text

    blank = f"auto ({definition.auto_description()})" if definition.accepts_auto else str(definition.default)
    options = {
        "label": definition.label,
        "required": False,
        "validators": [validate],
        "help_text": f"{definition.doc} Blank = {blank}.",
    }
    if definition.type is str:
        return forms.CharField(**options)
    # Bounds as widget attributes only: the validator above gives the message, not Django's own.
    widget = forms.NumberInput(attrs={"min": definition.minimum, "max": definition.maximum})
    field_class = forms.IntegerField if definition.type is int else forms.FloatField
    return field_class(widget=widget, **options)


# --- The API schema ----------------------------------------------------------------


class DefinedValue(serializers.Field):
    """One defined value in the API, documented from its definition and refused with its sentence."""

    def __init__(self, definition: Hyperparameter, **kwargs):
        self.definition = definition
        auto = f" auto: {definition.auto_description()}." if definition.accepts_auto else ""
        super().__init__(required=False, allow_null=True, help_text=definition.doc + auto, **kwargs)

    def to_internal_value(self, data):
        if self.definition.accepts_auto and data == "auto":
            return data
        message = self.definition.public_problem(data)
        if message is not None:
            # The domain error, not a DRF ValidationError: the same message and param as the form and the service.
            raise InvalidInput(message, param=self.definition.name)
        return self.definition.clean(data)

    def to_representation(self, value):
        return value


class DefinedValueSchema(OpenApiSerializerFieldExtension):
    """Type, bounds and doc of a DefinedValue, straight from its definition."""

    target_class = DefinedValue

    def map_serializer_field(self, auto_schema, direction):
        definition = self.target.definition
        value = {"type": {int: "integer", float: "number", str: "string"}[definition.type]}
        if definition.minimum is not None:
            value.update(minimum=definition.minimum, maximum=definition.maximum)
        if definition.accepts_auto and definition.type is str:
            value["not"] = {"enum": ["auto"]}  # else "auto" is both branches of the oneOf, which then refuses it
        if definition.accepts_auto:
            return {
                "oneOf": [value, {"type": "string", "enum": ["auto"]}],
                "default": "auto",
                "description": self.target.help_text,
                "nullable": True,
            }
        return {**value, "default": definition.default, "description": self.target.help_text, "nullable": True}


Hyperparameters = type(
    "Hyperparameters",
    (serializers.Serializer,),
    {
        "__doc__": 'Training hyperparameters; each is a value or "auto".',
        **{definition.name: DefinedValue(definition) for definition in HYPERPARAMETERS},
    },
)
"""Documentation only: the schema of the `hyperparameters` object, generated from the definitions."""


@extend_schema_field(Hyperparameters)
class HyperparametersField(serializers.JSONField):
    """The `hyperparameters` object: taken as JSON, refused by check_hyperparameters with the API's own messages."""


class SupervisedMethod(serializers.Serializer):
    """Documentation only: `method.supervised`."""

    hyperparameters = Hyperparameters(required=False)


class DpoMethod(serializers.Serializer):
    """Documentation only: `method.dpo`; its hyperparameters add beta."""

    hyperparameters = Hyperparameters(required=False)


class FineTuningMethod(serializers.Serializer):
    """Documentation only: openai's `method` object, the newer home of the same hyperparameters.

    supervised trains on chat examples, dpo on preference pairs; without `method` the
    training file decides.
    """

    type = serializers.ChoiceField(choices=["supervised", "dpo"])
    supervised = SupervisedMethod(required=False)
    dpo = DpoMethod(required=False)


@extend_schema_field(FineTuningMethod)
class MethodField(serializers.JSONField):
    """The `method` object: taken as JSON; the API view reads the hyperparameters out of it."""


# --- The job pages ---------------------------------------------------------------


# How the pages name each resolved setting, and what a 0 means where it means something.
SETTING_LABELS = {
    "n_epochs": "Epochs",
    "batch_size": "Batch size (examples per step)",
    "learning_rate_multiplier": "Learning rate multiplier",
    "learning_rate": "Learning rate",
    "max_seq_len": "Max sequence length",
    "eval_every": "Evaluate",
    "save_every": "Checkpoint",
    "warmup_ratio": "Warmup",
    "early_stopping_patience": "Early stopping",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "target_modules": "LoRA target modules",
    "beta": "DPO beta",
    "total_steps": "Total steps",
}


def describe_setting(name: str, value, *, validation: bool = True) -> str:
    """A resolved setting's value as a person reads it: "at the end", not eval_every 0."""
    if name == "eval_every":
        if not validation:
            return "never (no validation data)"
        return f"every {value} steps and at the end" if value else "at the end"
    if name == "save_every":
        return f"every {value} steps and each epoch" if value else "each epoch"
    if name == "early_stopping_patience":
        return f"after {value} evaluations without a better validation loss" if value else "off"
    if name == "warmup_ratio":
        return f"{value * 100:.4g}% of the steps" if isinstance(value, (int, float)) else str(value)
    return str(value)


def described_settings(resolved: dict, *, validation: bool = True) -> list[tuple[str, str]]:
    """(label, value) for each resolved setting, in the order they were resolved."""
    return [
        (SETTING_LABELS.get(name, name), describe_setting(name, value, validation=validation))
        for name, value in (resolved or {}).items()
    ]
