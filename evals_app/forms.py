"""The "New evaluation" form: one to three models, a processed dataset, the graders (the data's default, presets,
or OpenAI grader JSON) and how many examples to answer."""

import json

from django import forms
from django.conf import settings

from datasets_app.selectors import ready_datasets_for
from deployments_app.catalog.selectors import model_choices
from deployments_app.models import ModelCard
from llm.evals.graders import CONTAINS, EXACT_MATCH, ROUGE_L, TOOL_CALL, similarity_grader

MAX_MODELS = 3
DEFAULT_MAX_EXAMPLES = 200

PRESETS = {
    "exact_match": ("Exact match", EXACT_MATCH),
    "contains": ("Contains the reference (ilike)", CONTAINS),
    "rouge_l": ("ROUGE-L (pass at 0.5)", ROUGE_L),
    # Sentence BLEU is harsh on short answers: a lower bar than ROUGE's.
    "bleu": ("BLEU (pass at 0.3)", similarity_grader("bleu", 0.3)),
    "fuzzy_match": ("Fuzzy match (pass at 0.8)", similarity_grader("fuzzy_match", 0.8)),
    "tool_call": ("Tool call (name and arguments)", TOOL_CALL),
}
"""Graders in OpenAI's JSON shapes (tool_call is ours), over items made from chat examples."""

GRADER_SOURCES = [
    ("default", "Default for the data"),
    ("presets", "Presets"),
    ("custom", "Custom JSON (an OpenAI testing_criteria list)"),
]


class EvalForm(forms.Form):
    name = forms.CharField(label="Name", max_length=200, required=False)
    models = forms.MultipleChoiceField(
        label="Models", widget=forms.CheckboxSelectMultiple, help_text="One to three; the first one picked is A."
    )
    dataset = forms.ChoiceField(label="Dataset")
    graders = forms.ChoiceField(
        label="Graders",
        choices=GRADER_SOURCES,
        initial="default",
        widget=forms.RadioSelect,
        help_text="The default: exact match for short answers, ROUGE-L for longer ones, tool calls for function calling.",
    )
    presets = forms.MultipleChoiceField(
        label="Presets",
        choices=[(key, label) for key, (label, _) in PRESETS.items()],
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )
    custom = forms.CharField(
        label="Custom graders (JSON)",
        widget=forms.Textarea(attrs={"rows": 6, "spellcheck": "false"}),
        required=False,
        help_text="Items have input, reference, reference_tool_calls and tools: {{item.reference}}, {{sample.output_text}}.",
    )
    max_examples = forms.IntegerField()  # replaced in __init__

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["models"].choices = [(model, model) for model in model_choices(user)]
        self.fields["dataset"].choices = [
            (d.public_id, f"{d.filename} · {d.examples} examples · {d.public_id}") for d in ready_datasets_for(user)
        ]
        # Bounded by a setting that tests change, so made here rather than once at import.
        self.fields["max_examples"] = forms.IntegerField(
            label="Max examples", min_value=1, max_value=settings.FT_EVAL_MAX_ITEMS, initial=DEFAULT_MAX_EXAMPLES
        )
        if not self.is_bound and "models" not in self.initial:
            card = ModelCard.objects.owned_by(user).first()
            self.initial["models"] = [card.base_model, card.model_id] if card else []

    def clean_models(self) -> list[str]:
        models = list(dict.fromkeys(self.cleaned_data["models"]))
        if len(models) > MAX_MODELS:
            raise forms.ValidationError(f"Pick at most {MAX_MODELS} models, not {len(models)}.")
        return models

    def clean_custom(self) -> list | None:
        if self.cleaned_data.get("graders") != "custom":
            return None
        text = self.cleaned_data["custom"].strip()
        if not text:
            raise forms.ValidationError("Write the graders as JSON, or pick the default or presets.")
        try:
            criteria = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc}.") from None
        return [criteria] if isinstance(criteria, dict) else criteria

    def clean(self):
        data = super().clean()
        if data.get("graders") == "presets" and not data.get("presets"):
            self.add_error("presets", "Pick at least one preset.")
        return data

    def chosen_criteria(self) -> list | None:
        """The graders picked as presets or written as JSON; None for the data's default."""
        data = self.cleaned_data
        if data["graders"] == "presets":
            return [dict(PRESETS[key][1]) for key in data["presets"]]
        if data["graders"] == "custom":
            return data["custom"]
        return None

    def field_for(self, param: str | None) -> str | None:
        """The field a service's refusal belongs beside: its param (`data_source.model`) read as one of ours."""
        param = param or ""
        if param.startswith("testing_criteria"):
            return "custom" if self.cleaned_data.get("graders") == "custom" else None
        if param.startswith("data_source.model"):
            return "models"
        if param.startswith("data_source.source"):
            return "dataset"
        return "name" if param == "name" else None
