from django.conf import settings
from django.db import models
from django.utils import timezone


class ModelCardQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)


class ModelCard(models.Model):
    """A fine-tuned model: what it was trained from, how, and where its files are."""

    model_id = models.CharField(max_length=300, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_cards")
    job = models.OneToOneField("jobs_app.FineTuningJob", on_delete=models.SET_NULL, null=True, related_name="model_card")
    base_model = models.CharField(max_length=200)
    method = models.CharField(max_length=16, default="lora")
    # A PEFT adapter folder for adapter methods, a full model folder otherwise.
    path = models.CharField(max_length=500)
    hyperparameters = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    objects = ModelCardQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.model_id

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "dora", "qlora")
