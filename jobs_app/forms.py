from django import forms

from datasets_app.selectors import ready_datasets_for
from deployments_app.catalog import base_models

from .hyperparameters import METHODS


class JobForm(forms.Form):
    model = forms.ChoiceField(label="Base model")
    training_file = forms.ChoiceField(label="Training data")
    validation_file = forms.ChoiceField(label="Validation data", required=False)
    method = forms.ChoiceField(label="Method", choices=[(m, m.upper() if m != "full" else "Full fine-tuning") for m in METHODS if m != "qlora"], initial="lora")
    n_epochs = forms.IntegerField(label="Epochs", min_value=1, max_value=50, required=False, help_text="Blank = auto")
    learning_rate_multiplier = forms.FloatField(label="Learning rate multiplier", min_value=0.0001, max_value=100, required=False, help_text="Blank = auto (1.0)")
    batch_size = forms.IntegerField(label="Batch size", min_value=1, max_value=256, required=False, help_text="Blank = auto")
    lora_rank = forms.IntegerField(label="LoRA rank", min_value=1, max_value=256, required=False, help_text="Blank = auto (16)")
    suffix = forms.CharField(label="Model name suffix", max_length=64, required=False)
    seed = forms.IntegerField(label="Seed", min_value=0, required=False, initial=42)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.id, m.id) for m in base_models() if m.ready]
        datasets = [(d.public_id, f"{d.filename} · {d.examples} examples · {d.public_id}") for d in ready_datasets_for(user)]
        self.fields["training_file"].choices = datasets
        self.fields["validation_file"].choices = [("", "None")] + datasets

    def hyperparameters(self) -> dict:
        names = ("n_epochs", "learning_rate_multiplier", "batch_size", "lora_rank")
        return {name: self.cleaned_data[name] for name in names if self.cleaned_data.get(name) is not None}
