"""Fine-tuning jobs, their events (log lines and metric points) and checkpoints."""

from functools import partial

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.text import slugify

from finetune_site.ids import new_id
from finetune_site.store import SharedPathField


class JobQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)

    def active(self):
        return self.filter(status__in=FineTuningJob.ACTIVE_STATUSES)


class FineTuningJob(models.Model):
    VALIDATING = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STATUS_CHOICES = [(s, s) for s in (VALIDATING, QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE_STATUSES = (VALIDATING, QUEUED, RUNNING)
    FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
    SFT = "sft"
    DPO = "dpo"
    OBJECTIVE_CHOICES = [(SFT, "Supervised (SFT)"), (DPO, "Preference (DPO)")]

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "ftjob"))
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    base_model = models.CharField(max_length=200)
    # Files may be deleted once no active job needs them; the ids stay on record.
    training_file = models.ForeignKey(
        "datasets_app.Dataset", on_delete=models.SET_NULL, null=True, blank=True, related_name="training_jobs"
    )
    validation_file = models.ForeignKey(
        "datasets_app.Dataset", on_delete=models.SET_NULL, null=True, blank=True, related_name="validation_jobs"
    )
    training_file_ref = models.CharField(max_length=40)
    validation_file_ref = models.CharField(max_length=40, blank=True)
    method = models.CharField(max_length=16, default="lora")
    # What it trains toward: the replies of chat examples (sft) or the preferred answers of pairs (dpo).
    # The engine's words; the API says "supervised" for sft (jobs_app.objectives maps them).
    objective = models.CharField(max_length=8, choices=OBJECTIVE_CHOICES, default=SFT)
    # The user's fine-tuned model (or checkpoint) it starts from, trained on base_model; blank: the base itself.
    init_model = models.CharField(max_length=300, blank=True)
    # What the caller asked for ("auto" allowed) and what the run uses.
    hyperparameters = models.JSONField(default=dict)
    resolved = models.JSONField(default=dict)
    suffix = models.CharField(max_length=64, blank=True)
    seed = models.IntegerField(default=42)
    processes = models.PositiveSmallIntegerField(default=1)
    """Training processes (torchrun ranks, DDP) on each machine; 1 (on one machine) trains inside the worker itself."""
    nodes = models.PositiveSmallIntegerField(default=1)
    """Machines the ranks span: the worker that claims the job, and nodes - 1 training workers it asks to join."""
    rendezvous = models.CharField(max_length=260, blank=True)
    """host:port where the machines meet, an address of the claiming worker's machine; blank: FT_TRAIN_RENDEZVOUS."""
    # The share of the training file asked to be held out for validation (0: none).
    holdout_percent = models.PositiveSmallIntegerField(default=0)
    # When the job last joined the training queue (created, resumed, retried or re-queued
    # after a lost worker): workers take jobs in this order, not in the order of creation.
    queued_at = models.DateTimeField(default=timezone.now)
    metadata = models.JSONField(null=True, blank=True)
    # OpenAI's `integrations` as sent (a wandb run), and the trackers asked for by name (FT_REPORT_TO or the form).
    integrations = models.JSONField(default=list, blank=True)
    report_to = models.JSONField(default=list, blank=True)
    # Where each tracker writes (a folder, a tracking URI and run id), from the first run on: a resumed job continues there.
    tracking = models.JSONField(default=dict, blank=True)

    # Written only by jobs_app.transitions, the one place that knows which moves are allowed.
    status = models.CharField(max_length=20, choices=STATUS_CHOICES, default=QUEUED)
    # A request from the user that the running worker acts on at its next step.
    control = models.CharField(max_length=10, blank=True)
    error = models.JSONField(null=True, blank=True)
    fine_tuned_model = models.CharField(max_length=300, blank=True)
    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(default=0)
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    estimated_finish = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.public_id

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL_STATUSES

    @property
    def progress_percent(self) -> int:
        if self.status == self.SUCCEEDED:
            return 100
        if not self.total_steps:
            return 0
        return min(100, int(100 * self.step / self.total_steps))

    @property
    def fine_tuned_model_id(self) -> str:
        """`ft:{base}:{owner}:{suffix}:{short-id}`, known from creation on."""
        owner = slugify(self.owner.username) or f"user{self.owner_id}"
        return f"ft:{self.base_model}:{owner}:{self.suffix}:{self.public_id[-8:]}"

    @property
    def display_name(self) -> str:
        """How charts and tables tell jobs apart: the suffix the user chose, else the id."""
        return f"{self.suffix} ({self.public_id[-8:]})" if self.suffix else self.public_id

    @property
    def trackers(self) -> list[str]:
        """The trackers that record its runs: those asked for by name, and W&B when an integration asks for it."""
        from .trackers import names_of

        return names_of(self.report_to or [], self.integrations or [])

    @property
    def output_dir(self):
        return settings.FT_ARTIFACTS_DIR / "jobs" / self.public_id

    @property
    def model_dir(self):
        """Where training leaves the model it made: a PEFT adapter's folder, or a full model's."""
        return self.output_dir / ("model" if self.method == "full" else "adapter")


class JobEvent(models.Model):
    """A log line or a metrics point of a job (the API's `fine_tuning.job.event`)."""

    MESSAGE = "message"
    METRICS = "metrics"

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "ftevent"))
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=8, default="info")
    type = models.CharField(max_length=10, default=MESSAGE)
    message = models.TextField(blank=True)
    step = models.IntegerField(null=True, blank=True)
    data = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "type", "step"])]


class Checkpoint(models.Model):
    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "ftckpt"))
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.IntegerField()
    path = SharedPathField(max_length=500)
    metrics = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")]

    @property
    def model_id(self) -> str:
        return f"{self.job.fine_tuned_model_id}:ckpt-step-{self.step}" if self.job.fine_tuned_model_id else ""
