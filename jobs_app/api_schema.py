"""The fine-tuning jobs API's schema: documentation only, each shape mirroring the function in api.py that writes it."""

from drf_spectacular.utils import OpenApiParameter, extend_schema_field
from rest_framework import serializers

from finetune_site.openapi import Choice, Const, MetadataField, page_of, path_parameter
from llm.train.config import METHODS

from .models import FineTuningJob, JobEvent
from .objectives import public_names

CHECKPOINT_METRICS = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
"""The engine stores a checkpoint's metrics under the names of OpenAI's checkpoint object."""

DPO_CHECKPOINT_METRICS = (
    "train_reward_accuracy",
    "valid_reward_accuracy",
    "train_reward_margin",
    "valid_reward_margin",
)
"""What a DPO run's checkpoints add (their token accuracies are None)."""

JOB_ID = path_parameter("job_id", "A fine-tuning job id (`ftjob-...`).")

METADATA_FILTER = OpenApiParameter(
    "metadata",
    {"type": "object", "additionalProperties": {"type": "string"}},
    style="deepObject",
    explode=True,
    description="Only jobs whose metadata holds these pairs: `metadata[key]=value`.",
)


@extend_schema_field({"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["auto"]}]})
class IntegerOrAuto(serializers.Field):
    pass


@extend_schema_field({"anyOf": [{"type": "number"}, {"type": "string", "enum": ["auto"]}]})
class NumberOrAuto(serializers.Field):
    pass


class JobHyperparameters(serializers.Serializer):
    """What was asked, and numbers once the job has resolved them (`public_hyperparameters`)."""

    n_epochs = IntegerOrAuto()
    batch_size = IntegerOrAuto()
    learning_rate_multiplier = NumberOrAuto()
    beta = NumberOrAuto(required=False, help_text="DPO jobs only.")


class JobMethodSection(serializers.Serializer):
    hyperparameters = JobHyperparameters()


class JobMethod(serializers.Serializer):
    """openai's `method`, always returned, whether the job was created with it or with `hyperparameters`."""

    type = Choice(public_names())
    supervised = JobMethodSection(required=False)
    dpo = JobMethodSection(required=False)


class JobError(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField(help_text="For invalid files, every problem with its line number.")
    param = serializers.CharField(allow_null=True)


class JobProgress(serializers.Serializer):
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(help_text="0 until the job has started.")


class WandbIntegration(serializers.Serializer):
    project = serializers.CharField()
    name = serializers.CharField(required=False, allow_null=True)
    entity = serializers.CharField(required=False, allow_null=True)
    tags = serializers.ListField(child=serializers.CharField(), required=False)


class JobIntegration(serializers.Serializer):
    type = Choice(["wandb"])
    wandb = WandbIntegration()


class JobObject(serializers.Serializer):
    """A fine-tuning job (`job_object`); timestamps are Unix seconds."""

    id = serializers.CharField()
    object = Const("fine_tuning.job")
    created_at = serializers.IntegerField()
    model = serializers.CharField(help_text="The base model, or the fine-tuned model the job continues.")
    organization_id = serializers.CharField()
    status = Choice([status for status, _ in FineTuningJob.STATUS_CHOICES])
    training_file = serializers.CharField()
    validation_file = serializers.CharField(allow_null=True)
    hyperparameters = JobHyperparameters()
    method = JobMethod()
    training_type = Choice(METHODS, help_text="Ours: how the weights are trained.")
    fine_tuned_model = serializers.CharField(
        allow_null=True, help_text="`ft:{base}:{owner}:{suffix}:{short-id}` once the job has succeeded."
    )
    finished_at = serializers.IntegerField(allow_null=True)
    trained_tokens = serializers.IntegerField(allow_null=True)
    result_files = serializers.ListField(child=serializers.CharField())
    seed = serializers.IntegerField()
    error = JobError(allow_null=True)
    estimated_finish = serializers.IntegerField(allow_null=True)
    integrations = JobIntegration(many=True)
    metadata = MetadataField(allow_null=True)
    user_provided_suffix = serializers.CharField(allow_null=True)
    progress = JobProgress(help_text="Ours: the training step reached.")
    processes = serializers.IntegerField(
        required=False, min_value=1, help_text="Ours: training processes (DDP ranks) on each machine."
    )
    nodes = serializers.IntegerField(required=False, min_value=1, help_text="Ours: machines the processes span.")
    rendezvous = serializers.CharField(
        required=False, allow_null=True, help_text="Ours: host:port where the machines meet; null: FT_TRAIN_RENDEZVOUS."
    )


class JobEventObject(serializers.Serializer):
    """A log line or, with type `metrics`, a metrics point in both openai's and zhipuai's words."""

    id = serializers.CharField()
    object = Const("fine_tuning.job.event")
    created_at = serializers.IntegerField()
    level = Choice(["info", "warn", "error"])
    message = serializers.CharField(allow_blank=True)
    type = Choice([JobEvent.MESSAGE, JobEvent.METRICS])
    data = serializers.DictField(allow_null=True, help_text="The metrics of a metrics event; {} otherwise.")


# A metric is null until measured (no validation data, or a DPO run's token accuracy).
CheckpointMetrics = type(
    "CheckpointMetrics",
    (serializers.Serializer,),
    {
        "step": serializers.IntegerField(),
        **{name: serializers.FloatField(allow_null=True) for name in CHECKPOINT_METRICS},
        **{name: serializers.FloatField(allow_null=True, required=False) for name in DPO_CHECKPOINT_METRICS},
    },
)


class JobCheckpointObject(serializers.Serializer):
    id = serializers.CharField()
    object = Const("fine_tuning.job.checkpoint")
    created_at = serializers.IntegerField()
    fine_tuned_model_checkpoint = serializers.CharField(help_text="A model id that chat completions accept.")
    fine_tuning_job_id = serializers.CharField()
    step_number = serializers.IntegerField()
    metrics = CheckpointMetrics()


JobList = page_of(JobObject, "JobList")
JobEventList = page_of(JobEventObject, "JobEventList")
JobCheckpointList = page_of(JobCheckpointObject, "JobCheckpointList")
