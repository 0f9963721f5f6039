"""The "Create fine-tuning task" form; its hyperparameter fields come from their definitions."""

from django import forms
from django.conf import settings

from datasets_app.selectors import ready_datasets_for
from deployments_app.catalog import base_models
from deployments_app.models import ModelCard
from llm.train.hyperparameters import HYPERPARAMETERS as DEFINITIONS

from .hyperparameters import HOLDOUT_PERCENT, METHODS, form_field
from .models import FineTuningJob
from .objectives import kind_words, objective_of
from .trackers import LABELS as TRACKER_LABELS

METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tuning", "qlora": "QLoRA (CUDA workers only)"}
HYPERPARAMETERS = tuple(definition.name for definition in DEFINITIONS)

# One field per definition, generated, so a new hyperparameter reaches the form by being defined.
_HyperparameterFields = type("_HyperparameterFields", (forms.Form,), {d.name: form_field(d) for d in DEFINITIONS})


class JobForm(_HyperparameterFields):
    model = forms.ChoiceField(
        label="Base model",
        help_text="Or one of your fine-tuned models, to train on from it (DPO after SFT); its method carries on.",
    )
    training_file = forms.ChoiceField(label="Training data")
    validation_file = forms.ChoiceField(label="Validation data", required=False)
    holdout_percent = form_field(HOLDOUT_PERCENT)
    objective = forms.ChoiceField(
        label="Objective",
        choices=FineTuningJob.OBJECTIVE_CHOICES,
        required=False,
        help_text="Follows the training data: chat examples train supervised (SFT), preference pairs train DPO.",
    )
    method = forms.ChoiceField(label="Method", choices=[(m, METHOD_LABELS[m]) for m in METHODS], initial="lora")
    suffix = forms.CharField(label="Model name suffix", max_length=64, required=False)
    seed = forms.IntegerField(label="Seed", min_value=0, max_value=2**31 - 1, required=False, initial=42)
    report_to = forms.MultipleChoiceField(
        label="Experiment trackers",
        choices=[
            (name, f"{label} (offline unless WANDB_API_KEY is set)" if name == "wandb" else label)
            for name, label in TRACKER_LABELS.items()
        ],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="Every metric of the run is written with their own libraries too; the job page says where.",
    )

    field_order = [
        "model",
        "training_file",
        "validation_file",
        "holdout_percent",
        "objective",
        "method",
        *HYPERPARAMETERS,
        "suffix",
        "seed",
        "report_to",
    ]

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        fine_tuned = ModelCard.objects.owned_by(user).values_list("model_id", flat=True)
        self.fields["model"].choices = [(m.id, m.id) for m in base_models() if m.ready] + [
            (model_id, f"{model_id} (fine-tuned: train on from it)") for model_id in fine_tuned
        ]
        ready = list(ready_datasets_for(user))
        datasets = [
            (d.public_id, f"{d.filename} · {d.examples} examples · {kind_words(d)} · {d.public_id}") for d in ready
        ]
        self.fields["training_file"].choices = datasets
        self.fields["validation_file"].choices = [("", "None")] + datasets
        # What each dataset trains (None: nothing), for the page script that follows the chosen one.
        self.dataset_objectives = {d.public_id: objective_of(d) for d in ready}
        objective = self.current_objective()
        if not self.is_bound:
            self.initial.setdefault("objective", objective)
            self.initial.setdefault("report_to", settings.FT_REPORT_TO)
        for definition in DEFINITIONS:
            if len(definition.objectives) < len(FineTuningJob.OBJECTIVE_CHOICES):
                # Shown only for its objectives (beta for DPO); a hidden one is disabled so it is not sent.
                field = self.fields[definition.name]
                field.objectives = " ".join(definition.objectives)
                if objective not in definition.objectives:
                    field.widget.attrs["disabled"] = True

    def current_objective(self) -> str:
        """The objective asked for, else the one the chosen (or first) training file trains."""
        values = self.data if self.is_bound else self.initial
        if values.get("objective") in dict(FineTuningJob.OBJECTIVE_CHOICES):
            return values["objective"]
        chosen = values.get("training_file") or next(iter(self.dataset_objectives), "")
        return self.dataset_objectives.get(chosen) or FineTuningJob.SFT

    hyperparameter_names = HYPERPARAMETERS

    def hyperparameters(self) -> dict:
        return {
            name: self.cleaned_data[name] for name in HYPERPARAMETERS if self.cleaned_data.get(name) not in (None, "")
        }

    @staticmethod
    def initial_from_job(job) -> dict:
        """The form filled with a job's settings ("New job like this")."""
        initial = {
            "model": job.init_model or job.base_model,
            "training_file": job.training_file_ref,
            "validation_file": job.validation_file_ref,
            "method": job.method,
            "objective": job.objective,
            "suffix": job.suffix,
            "seed": job.seed,
            "report_to": job.trackers,
        }
        initial.update({k: v for k, v in (job.hyperparameters or {}).items() if k in HYPERPARAMETERS and v != "auto"})
        if job.holdout_percent and not job.validation_file_ref:
            # The split never happened (the job failed first): ask for it again. Once it
            # has, the job's files are its two parts, which hold exactly the same data.
            initial["holdout_percent"] = job.holdout_percent
        return initial
