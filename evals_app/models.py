"""Evaluations: a set of graders over a kind of data (Eval), one model answering one dataset (EvalRun), and
each example's answer and scores (EvalOutputItem). The shapes follow OpenAI's Evals API."""

from functools import partial

from django.conf import settings
from django.db import models
from django.utils import timezone

from finetune_site.ids import new_id


class EvalQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)


class Eval(models.Model):
    USER, AUTO, FORGETTING, COMPARE = "user", "auto", "forgetting", "compare"
    KIND_CHOICES = [(k, k) for k in (USER, AUTO, FORGETTING, COMPARE)]

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "eval"))
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="evals")
    name = models.CharField(max_length=200, blank=True)
    # OpenAI's data_source_config: {"type": "custom", "item_schema": {...}, "include_sample_schema": bool}.
    data_source_config = models.JSONField(default=dict)
    # OpenAI's grader objects (llm.evals.graders checks them).
    testing_criteria = models.JSONField(default=list)
    metadata = models.JSONField(null=True, blank=True)
    # Why it exists: asked for (user), made at a job's end (auto: held-out data; forgetting: the general
    # set), or the playground's batch compare.
    kind = models.CharField(max_length=12, choices=KIND_CHOICES, default=USER)
    job = models.ForeignKey(
        "jobs_app.FineTuningJob", on_delete=models.SET_NULL, null=True, blank=True, related_name="evaluations"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = EvalQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.public_id


class EvalRunQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)


class EvalRun(models.Model):
    QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELED = "queued", "in_progress", "completed", "failed", "canceled"
    STATUS_CHOICES = [(s, s) for s in (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELED)]
    ACTIVE_STATUSES = (QUEUED, IN_PROGRESS)

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "evalrun"))
    eval = models.ForeignKey(Eval, on_delete=models.CASCADE, related_name="runs")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="eval_runs")
    name = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=300)
    # OpenAI's run data_source: {"type": "completions", "model", "source", "input_messages", "sampling_params"}.
    data_source = models.JSONField(default=dict)
    metadata = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=12, choices=STATUS_CHOICES, default=QUEUED)
    # "cancel" while the user asked the running task to stop.
    control = models.CharField(max_length=10, blank=True)
    error = models.JSONField(null=True, blank=True)
    total = models.IntegerField(default=0)
    done = models.IntegerField(default=0)
    # {"total", "passed", "failed", "errored"} and [{"testing_criteria", "passed", "failed"}] as OpenAI writes them.
    result_counts = models.JSONField(default=dict)
    per_testing_criteria_results = models.JSONField(default=list)
    # Per grader: mean with its 95% bootstrap interval, errors, and per-label accuracy for label tasks.
    aggregates = models.JSONField(default=dict)
    usage = models.JSONField(default=dict)
    attempts = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    objects = EvalRunQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.public_id

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES


class EvalOutputItem(models.Model):
    PASS, FAIL, ERROR = "pass", "fail", "error"

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "outputitem"))
    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="items")
    # The example's position in the data source: rows of runs over the same data line up by it.
    index = models.IntegerField()
    item = models.JSONField(default=dict)
    # The messages the model was sent, its answer (text and tool calls), or why it gave none.
    input = models.JSONField(default=list)
    output_text = models.TextField(blank=True)
    output_tools = models.JSONField(default=list)
    finish_reason = models.CharField(max_length=20, blank=True)
    error = models.TextField(blank=True)
    usage = models.JSONField(default=dict)
    # One GraderResult.as_dict() per testing criterion, in their order.
    results = models.JSONField(default=list)
    status = models.CharField(max_length=8, default=PASS)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["run", "index"], name="one_output_per_example")]
