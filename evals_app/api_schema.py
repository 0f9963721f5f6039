"""The evals API's schema: documentation only, each shape mirroring the function in api.py that writes it."""

from drf_spectacular.utils import OpenApiParameter, extend_schema_field
from rest_framework import serializers

from finetune_site.openapi import Choice, Const, MetadataField, page_of, path_parameter
from llm.evals.graders import GRADER_TYPES

from .models import EvalOutputItem, EvalRun

EVAL_ID = path_parameter("eval_id", "An eval id (`eval-...`).")
RUN_ID = path_parameter("run_id", "A run id of that eval (`evalrun-...`).")
ITEM_ID = path_parameter("item_id", "An output item id of that run (`outputitem-...`).")
RUN_STATUS = OpenApiParameter(
    "status",
    {"type": "string", "enum": [status for status, _ in EvalRun.STATUS_CHOICES]},
    description="Only runs in this status.",
)
ITEM_STATUS = OpenApiParameter(
    "status",
    {"type": "string", "enum": [EvalOutputItem.PASS, EvalOutputItem.FAIL, EvalOutputItem.ERROR]},
    description="Only items with this outcome.",
)


@extend_schema_field(
    {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["custom", "chat"]},
            "item_schema": {"type": "object", "description": "custom: a JSON schema of each item."},
            "include_sample_schema": {"type": "boolean", "description": "custom: whether graders may read `sample`."},
        },
        "description": 'OpenAI\'s {"type": "custom", "item_schema": {...}}, or ours: {"type": "chat"}, '
        "whose items are the fields of a chat fine-tuning file.",
    }
)
class DataSourceConfigField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "name"],
            "properties": {"type": {"type": "string", "enum": list(GRADER_TYPES)}, "name": {"type": "string"}},
            "description": "A grader in OpenAI's shape; its other fields depend on its type.",
        },
    }
)
class TestingCriteriaField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "required": ["type", "model", "source"],
        "properties": {
            "type": {"type": "string", "enum": ["completions", "jsonl"]},
            "model": {"type": "string", "description": "The model that answers."},
            "source": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string", "enum": ["file_id", "file_content"]},
                    "id": {"type": "string"},
                    "content": {"type": "array", "items": {"type": "object"}},
                },
            },
            "input_messages": {"type": "object"},
            "sampling_params": {"type": "object"},
        },
    }
)
class DataSourceField(serializers.JSONField):
    pass


class DataSourceConfigObject(serializers.Serializer):
    type = Const("custom")
    schema = serializers.DictField(help_text="The JSON schema of what graders read: `item`, and `sample` if included.")


class EvalObject(serializers.Serializer):
    """An eval (`eval_object`): what the data looks like and how answers are graded."""

    object = Const("eval")
    id = serializers.CharField()
    name = serializers.CharField(allow_blank=True)
    data_source_config = DataSourceConfigObject()
    testing_criteria = serializers.ListField(child=serializers.DictField())
    created_at = serializers.IntegerField()
    metadata = MetadataField(allow_null=True)


class EvalDeleted(serializers.Serializer):
    object = Const("eval.deleted")
    deleted = serializers.BooleanField()
    eval_id = serializers.CharField()


class RunError(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ResultCounts(serializers.Serializer):
    total = serializers.IntegerField()
    errored = serializers.IntegerField()
    failed = serializers.IntegerField()
    passed = serializers.IntegerField()


class ModelUsage(serializers.Serializer):
    model_name = serializers.CharField()
    invocation_count = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()


class RunProgress(serializers.Serializer):
    done = serializers.IntegerField()
    total = serializers.IntegerField()


class EvalRunObject(serializers.Serializer):
    """A run of an eval (`run_object`): one model answering every item, each answer graded."""

    object = Const("eval.run")
    id = serializers.CharField()
    eval_id = serializers.CharField()
    name = serializers.CharField(allow_blank=True)
    model = serializers.CharField()
    status = Choice([status for status, _ in EvalRun.STATUS_CHOICES])
    created_at = serializers.IntegerField()
    data_source = serializers.DictField()
    error = RunError(allow_null=True)
    metadata = MetadataField(allow_null=True)
    report_url = serializers.CharField(help_text="The console page with this run's results.")
    result_counts = ResultCounts()
    per_testing_criteria_results = serializers.ListField(child=serializers.DictField())
    per_model_usage = ModelUsage(many=True)
    progress = RunProgress(help_text="Ours: items answered so far.")
    aggregates = serializers.DictField(help_text="Ours: per grader, the mean with its 95% bootstrap interval.")


class RunDeleted(serializers.Serializer):
    object = Const("eval.run.deleted")
    deleted = serializers.BooleanField()
    run_id = serializers.CharField()


class SampleMessage(serializers.Serializer):
    role = Const("assistant")
    content = serializers.CharField(allow_blank=True)
    tool_calls = serializers.ListField(child=serializers.DictField(), required=False)


class SampleUsage(ModelUsage):
    model_name = None
    invocation_count = None


class SampleError(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class Sample(serializers.Serializer):
    input = serializers.ListField(child=serializers.DictField(), help_text="The messages the model was sent.")
    output = SampleMessage(many=True)
    finish_reason = serializers.CharField(allow_blank=True)
    model = serializers.CharField()
    usage = SampleUsage()
    error = SampleError(allow_null=True)
    temperature = serializers.FloatField()
    max_completion_tokens = serializers.IntegerField(allow_null=True)
    top_p = serializers.FloatField()
    seed = serializers.IntegerField()


class OutputItemObject(serializers.Serializer):
    """One item of a run (`output_item_object`): what was asked, what the model answered, each grader's result."""

    object = Const("eval.run.output_item")
    id = serializers.CharField()
    run_id = serializers.CharField()
    eval_id = serializers.CharField()
    created_at = serializers.IntegerField()
    status = Choice([EvalOutputItem.PASS, EvalOutputItem.FAIL, EvalOutputItem.ERROR])
    datasource_item_id = serializers.IntegerField()
    datasource_item = serializers.DictField()
    results = serializers.ListField(child=serializers.DictField())
    sample = Sample()


EvalList = page_of(EvalObject, "EvalList")
EvalRunList = page_of(EvalRunObject, "EvalRunList")
OutputItems = page_of(OutputItemObject, "OutputItemList")
