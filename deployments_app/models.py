from functools import partial

from django.conf import settings
from django.db import models
from django.utils import timezone

from finetune_site.ids import new_id
from finetune_site.store import SharedPathField


class ModelCardQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)


class ModelCard(models.Model):
    """A fine-tuned model: what it was trained from, how, and where its files are."""

    model_id = models.CharField(max_length=300, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_cards")
    job = models.OneToOneField(
        "jobs_app.FineTuningJob", on_delete=models.SET_NULL, null=True, related_name="model_card"
    )
    base_model = models.CharField(max_length=200)
    method = models.CharField(max_length=16, default="lora")
    # sft or dpo, as its job trained (FineTuningJob.objective); the card outlives the job.
    objective = models.CharField(max_length=8, default="sft")
    # A PEFT adapter folder for adapter methods, a full model folder otherwise.
    path = SharedPathField(max_length=500)
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


class DeploymentQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)

    def active(self):
        return self.filter(status__in=(Deployment.DEPLOYING, Deployment.RUNNING))


class Deployment(models.Model):
    """A model served by N dedicated instances that share one request stream."""

    DEPLOYING, RUNNING, CANCELLED, FAILED = "deploying", "running", "cancelled", "failed"
    STATUS_CHOICES = [(s, s) for s in (DEPLOYING, RUNNING, CANCELLED, FAILED)]

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "dep"))
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="deployments")
    model_id = models.CharField(max_length=300)
    instances = models.PositiveSmallIntegerField(default=1, help_text="How many instances are wanted.")
    max_concurrent_requests = models.PositiveSmallIntegerField(
        default=16, help_text="Requests one instance takes at once (its engine answers them in shared batches)."
    )
    BACKEND_CHOICES = [(b, b) for b in ("auto", "embedded", "vllm")]  # llm.serve.vllm.BACKENDS
    backend = models.CharField(
        max_length=8, choices=BACKEND_CHOICES, blank=True, help_text="What was asked for; blank: FT_SERVING_BACKEND."
    )
    tensor_parallel_size = models.PositiveSmallIntegerField(
        default=1, help_text="GPUs each instance spreads the model over (vLLM only)."
    )
    status = models.CharField(max_length=12, choices=STATUS_CHOICES, default=DEPLOYING)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = DeploymentQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.public_id

    @property
    def is_active(self) -> bool:
        return self.status in (self.DEPLOYING, self.RUNNING)

    @property
    def stream_key(self) -> str:
        return f"ft:deployment:{self.public_id}:requests"

    def mark_running_if_ready(self) -> bool:
        """deploying -> running once every wanted instance has its model loaded."""
        running = self.instance_set.filter(status=Instance.RUNNING).count()
        if running < self.instances:
            return False
        return bool(
            Deployment.objects.filter(pk=self.pk, status=self.DEPLOYING).update(
                status=self.RUNNING, updated_at=timezone.now()
            )
        )


class Instance(models.Model):
    """One copy of a deployment's model, served by its own OS process (`manage.py serve_instance`)."""

    STARTING, RUNNING, STOPPING, STOPPED, DEAD = "starting", "running", "stopping", "stopped", "dead"
    STATUS_CHOICES = [(s, s) for s in (STARTING, RUNNING, STOPPING, STOPPED, DEAD)]
    LIVE = (STARTING, RUNNING, STOPPING)

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "inst"))
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="instance_set")
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=STARTING)
    backend = models.CharField(
        max_length=8, blank=True, help_text="What serves it, embedded or vllm; blank until chosen."
    )
    worker = models.CharField(max_length=200, blank=True)
    pid = models.IntegerField(null=True, blank=True, help_text="The serving process's id on its worker's host.")
    detail = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    requests_served = models.BigIntegerField(default=0)
    tokens_generated = models.BigIntegerField(default=0)
    errors = models.IntegerField(default=0)
    busy_seconds = models.FloatField(default=0.0)
    latency_p50_ms = models.FloatField(null=True, blank=True)
    latency_p95_ms = models.FloatField(null=True, blank=True)
    # The engine's load at the last heartbeat (ModelPool.load_stats()).
    queue_depth = models.IntegerField(default=0, help_text="Requests waiting to join the running batch.")
    running_requests = models.IntegerField(default=0, help_text="Rows in the running batch.")
    recent_tokens_per_second = models.FloatField(default=0.0, help_text="Tokens generated per second, last 10 s.")
    first_token_p50_ms = models.FloatField(null=True, blank=True)
    first_token_p95_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return self.public_id

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_generated / self.busy_seconds if self.busy_seconds > 0 else None

    @property
    def hours(self) -> float:
        """Instance-hours so far: from loaded to stopped (or now)."""
        if self.started_at is None:
            return 0.0
        end = self.stopped_at or (timezone.now() if self.status in self.LIVE else self.heartbeat_at or self.started_at)
        return max((end - self.started_at).total_seconds(), 0.0) / 3600

    def claim_running(self, worker: str) -> bool:
        """starting -> running once the model is loaded; False if it was stopped meanwhile."""
        now = timezone.now()
        return bool(
            Instance.objects.filter(pk=self.pk, status=self.STARTING).update(
                status=self.RUNNING, worker=worker, started_at=now, heartbeat_at=now
            )
        )

    def mark_final(self, status: str, detail: str = "") -> bool:
        """A live instance -> stopped or dead, its load zeroed; False if it had already ended."""
        return bool(
            Instance.objects.filter(pk=self.pk, status__in=self.LIVE).update(
                status=status,
                stopped_at=timezone.now(),
                detail=detail[:2000],
                queue_depth=0,
                running_requests=0,
                recent_tokens_per_second=0.0,
            )
        )
