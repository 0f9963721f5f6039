"""The fine-tuning jobs API (OpenAI shape, plus zhipuai's delete)."""

from django.db.models import TextField
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.api_errors import ApiError
from finetune_site.ids import unix
from finetune_site.pagination import cursor_page

from . import selectors, services
from .hyperparameters import (
    HOLDOUT_PERCENT,
    METHODS,
    DefinedValue,
    HyperparametersField,
    MethodField,
    public_hyperparameters,
)
from .models import Checkpoint, FineTuningJob, JobEvent


def job_object(job: FineTuningJob) -> dict:
    hyperparameters = public_hyperparameters(job.resolved, job.hyperparameters)
    return {
        "id": job.public_id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "model": job.base_model,
        "organization_id": f"org-{job.owner.username}",
        "status": job.status,
        "training_file": job.training_file_ref,
        "validation_file": job.validation_file_ref or None,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "training_type": job.method,
        "fine_tuned_model": job.fine_tuned_model or None,
        "finished_at": unix(job.finished_at),
        "trained_tokens": job.trained_tokens,
        "result_files": [],
        "seed": job.seed,
        "error": job.error,
        "estimated_finish": unix(job.estimated_finish),
        "integrations": [],
        "metadata": job.metadata,
        "user_provided_suffix": job.suffix or None,
        "progress": {"step": job.step, "total_steps": job.total_steps or job.resolved.get("total_steps", 0)},
    }


def event_object(event: JobEvent) -> dict:
    return {
        "id": event.public_id,
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data if event.type == JobEvent.METRICS else {},
    }


def checkpoint_object(checkpoint: Checkpoint) -> dict:
    m = checkpoint.metrics or {}
    return {
        "id": checkpoint.public_id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint.model_id,
        "fine_tuning_job_id": checkpoint.job.public_id,
        "step_number": checkpoint.step,
        "metrics": {"step": checkpoint.step, **{name: m.get(name) for name in CHECKPOINT_METRICS}},
    }


CHECKPOINT_METRICS = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
"""The engine stores a checkpoint's metrics under the names of OpenAI's checkpoint object."""


class JobCreateInput(serializers.Serializer):
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    hyperparameters = HyperparametersField(required=False, allow_null=True)
    method = MethodField(required=False, allow_null=True)
    training_type = serializers.CharField(
        required=False, allow_null=True, help_text=f"One of {', '.join(METHODS)}; default lora."
    )
    holdout_percent = DefinedValue(HOLDOUT_PERCENT)  # the form's name; openai's SDK sends it in extra_body
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=64)
    seed = serializers.IntegerField(required=False, allow_null=True)
    metadata = serializers.JSONField(required=False, allow_null=True)


def _hyperparameters_from(data: dict) -> dict | None:
    """zhipuai sends only `hyperparameters`, newer openai only `method`: accept either."""
    method = data.get("method")
    if method:
        if not isinstance(method, dict):
            raise ApiError('method must be an object like {"type": "supervised", ...}.', param="method")
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise ApiError(f'method.type {kind!r} is not supported yet; use "supervised".', param="method.type")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise ApiError(
                'method.supervised must be an object like {"hyperparameters": {...}}.', param="method.supervised"
            )
        nested = supervised.get("hyperparameters")
        if nested:
            return nested
    return data.get("hyperparameters")


def _owned(request, job_id: str) -> FineTuningJob:
    job = selectors.job_for(request.user, job_id)
    if job is None:
        raise Http404(f"No fine-tuning job with id {job_id!r} was found.")
    return job


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobListCreate(APIView):
    def get(self, request):
        jobs = selectors.jobs_for(request.user)
        for index, (key, value) in enumerate(request.query_params.items()):
            # openai sends metadata filters as metadata[key]=value. The key becomes a JSON path
            # parameter, never part of a lookup: "a__regex" is just a key that no job has.
            if key.startswith("metadata[") and key.endswith("]"):
                name = f"_metadata_{index}"
                text = Cast(KeyTextTransform(key[9:-1], "metadata"), TextField())  # compared as text, not JSON
                jobs = jobs.annotate(**{name: text}).filter(**{name: value})
        return Response(cursor_page(jobs, request.query_params, to_dict=job_object))

    @extend_schema(request=JobCreateInput, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        incoming = JobCreateInput(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        job = services.job_create(
            owner=request.user,
            model=data["model"],
            training_file=data["training_file"],
            validation_file=data.get("validation_file") or None,
            method=(data.get("training_type") or "lora").lower(),
            hyperparameters=_hyperparameters_from(data),
            holdout_percent=data.get("holdout_percent") or 0,
            suffix=data.get("suffix"),
            seed=data.get("seed"),
            metadata=data.get("metadata"),
        )
        return Response(job_object(job))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobDetail(APIView):
    def get(self, request, job_id):
        return Response(job_object(_owned(request, job_id)))

    def delete(self, request, job_id):
        return Response(job_object(services.job_delete(job=_owned(request, job_id))))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobCancel(APIView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, job_id):
        return Response(job_object(services.job_cancel(job=_owned(request, job_id))))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobPause(APIView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, job_id):
        return Response(job_object(services.job_pause(job=_owned(request, job_id))))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobResume(APIView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, job_id):
        return Response(job_object(services.job_resume(job=_owned(request, job_id))))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobEvents(APIView):
    def get(self, request, job_id):
        job = _owned(request, job_id)
        return Response(cursor_page(job.events.all(), request.query_params, to_dict=event_object))


@extend_schema(responses=OpenApiTypes.OBJECT)
class JobCheckpoints(APIView):
    def get(self, request, job_id):
        job = _owned(request, job_id)
        return Response(
            cursor_page(
                job.checkpoints.select_related("job__owner"),
                request.query_params,
                to_dict=checkpoint_object,
                default_limit=10,
            )
        )
