from django import forms

from datasets_app.selectors import ready_datasets_for
from deployments_app.catalog import base_models

from .hyperparameters import METHODS

METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tuning", "qlora": "QLoRA (CUDA workers only)"}
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier", "lora_rank", "lora_alpha", "lora_dropout",
                   "target_modules", "max_seq_len", "eval_every", "early_stopping_patience")


class JobForm(forms.Form):
    model = forms.ChoiceField(label="Base model")
    training_file = forms.ChoiceField(label="Training data")
    validation_file = forms.ChoiceField(label="Validation data", required=False)
    holdout_percent = forms.IntegerField(label="Or hold out % for validation", min_value=0, max_value=50, required=False,
                                         help_text="Used when no validation data is chosen")
    method = forms.ChoiceField(label="Method", choices=[(m, METHOD_LABELS[m]) for m in METHODS], initial="lora")
    n_epochs = forms.IntegerField(label="Epochs", min_value=1, max_value=50, required=False, help_text="Blank = auto")
    batch_size = forms.IntegerField(label="Batch size", min_value=1, max_value=256, required=False, help_text="Blank = auto")
    learning_rate_multiplier = forms.FloatField(label="Learning rate multiplier", min_value=0.0001, max_value=100, required=False, help_text="Blank = auto (1.0)")
    lora_rank = forms.IntegerField(label="LoRA rank", min_value=1, max_value=256, required=False, help_text="Blank = auto (16)")
    lora_alpha = forms.IntegerField(label="LoRA alpha", min_value=1, max_value=1024, required=False, help_text="Blank = auto (2 x rank)")
    lora_dropout = forms.FloatField(label="LoRA dropout", min_value=0, max_value=0.9, required=False, help_text="Blank = auto (0)")
    target_modules = forms.CharField(label="LoRA target modules", required=False, help_text="Blank = all-linear, or q_proj,v_proj,...")
    max_seq_len = forms.IntegerField(label="Max sequence length", min_value=32, max_value=32768, required=False, help_text="Blank = auto (1024)")
    eval_every = forms.IntegerField(label="Evaluate every N steps", min_value=0, required=False, help_text="Blank = at the end")
    early_stopping_patience = forms.IntegerField(label="Early stopping patience", min_value=0, max_value=1000, required=False,
                                                 help_text="Stop after N evaluations without a better validation loss; blank = off")
    suffix = forms.CharField(label="Model name suffix", max_length=64, required=False)
    seed = forms.IntegerField(label="Seed", min_value=0, max_value=2**31 - 1, required=False, initial=42)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.id, m.id) for m in base_models() if m.ready]
        datasets = [(d.public_id, f"{d.filename} · {d.examples} examples · {d.public_id}") for d in ready_datasets_for(user)]
        self.fields["training_file"].choices = datasets
        self.fields["validation_file"].choices = [("", "None")] + datasets

    hyperparameter_names = HYPERPARAMETERS

    def hyperparameters(self) -> dict:
        return {name: self.cleaned_data[name] for name in HYPERPARAMETERS if self.cleaned_data.get(name) not in (None, "")}

    @staticmethod
    def initial_from_job(job) -> dict:
        """The form filled with a job's settings ("New job like this")."""
        initial = {"model": job.base_model, "training_file": job.training_file_ref, "validation_file": job.validation_file_ref,
                   "method": job.method, "suffix": job.suffix, "seed": job.seed}
        initial.update({k: v for k, v in (job.hyperparameters or {}).items() if k in HYPERPARAMETERS and v != "auto"})
        if job.holdout_percent and not job.validation_file_ref:
            # The split never happened (the job failed first): ask for it again. Once it
            # has, the job's files are its two parts, which hold exactly the same data.
            initial["holdout_percent"] = job.holdout_percent
        return initial
