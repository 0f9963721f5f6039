"""The "Create fine-tuning task" form; its hyperparameter fields come from their definitions."""

from django import forms

from datasets_app.selectors import ready_datasets_for
from deployments_app.catalog import base_models
from llm.train.hyperparameters import HYPERPARAMETERS as DEFINITIONS

from .hyperparameters import HOLDOUT_PERCENT, METHODS, form_field

METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tuning", "qlora": "QLoRA (CUDA workers only)"}
HYPERPARAMETERS = tuple(definition.name for definition in DEFINITIONS)

# One field per definition, generated, so a new hyperparameter reaches the form by being defined.
_HyperparameterFields = type("_HyperparameterFields", (forms.Form,), {d.name: form_field(d) for d in DEFINITIONS})


class JobForm(_HyperparameterFields):
    model = forms.ChoiceField(label="Base model")
    training_file = forms.ChoiceField(label="Training data")
    validation_file = forms.ChoiceField(label="Validation data", required=False)
    holdout_percent = form_field(HOLDOUT_PERCENT)
    method = forms.ChoiceField(label="Method", choices=[(m, METHOD_LABELS[m]) for m in METHODS], initial="lora")
    suffix = forms.CharField(label="Model name suffix", max_length=64, required=False)
    seed = forms.IntegerField(label="Seed", min_value=0, max_value=2**31 - 1, required=False, initial=42)

    field_order = [
        "model",
        "training_file",
        "validation_file",
        "holdout_percent",
        "method",
        *HYPERPARAMETERS,
        "suffix",
        "seed",
    ]

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.id, m.id) for m in base_models() if m.ready]
        datasets = [
            (d.public_id, f"{d.filename} · {d.examples} examples · {d.public_id}") for d in ready_datasets_for(user)
        ]
        self.fields["training_file"].choices = datasets
        self.fields["validation_file"].choices = [("", "None")] + datasets

    hyperparameter_names = HYPERPARAMETERS

    def hyperparameters(self) -> dict:
        return {
            name: self.cleaned_data[name] for name in HYPERPARAMETERS if self.cleaned_data.get(name) not in (None, "")
        }

    @staticmethod
    def initial_from_job(job) -> dict:
        """The form filled with a job's settings ("New job like this")."""
        initial = {
            "model": job.base_model,
            "training_file": job.training_file_ref,
            "validation_file": job.validation_file_ref,
            "method": job.method,
            "suffix": job.suffix,
            "seed": job.seed,
        }
        initial.update({k: v for k, v in (job.hyperparameters or {}).items() if k in HYPERPARAMETERS and v != "auto"})
        if job.holdout_percent and not job.validation_file_ref:
            # The split never happened (the job failed first): ask for it again. Once it
            # has, the job's files are its two parts, which hold exactly the same data.
            initial["holdout_percent"] = job.holdout_percent
        return initial
