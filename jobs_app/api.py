"""The fine-tuning jobs API (OpenAI shape, plus zhipuai's delete)."""

from django.db.models import TextField
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.api_errors import ApiError
from finetune_site.ids import unix
from finetune_site.openapi import cursor_parameters, errors
from finetune_site.pagination import cursor_page

from . import selectors, services
from .api_schema import (
    CHECKPOINT_METRICS,
    DPO_CHECKPOINT_METRICS,
    JOB_ID,
    METADATA_FILTER,
    JobCheckpointList,
    JobEventList,
    JobList,
    JobObject,
)
from .hyperparameters import (
    HOLDOUT_PERCENT,
    METHODS,
    DefinedValue,
    HyperparametersField,
    MethodField,
    public_hyperparameters,
)
from .models import Checkpoint, FineTuningJob, JobEvent
from .objectives import from_public_name, public_name, public_names


def job_object(job: FineTuningJob) -> dict:
    hyperparameters = public_hyperparameters(job.resolved, job.hyperparameters, objective=job.objective)
    method_type = public_name(job.objective)
    return {
        "id": job.public_id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        # The model it was created with: a base model, or the fine-tuned model it continues.
        "model": job.init_model or job.base_model,
        "organization_id": f"org-{job.owner.username}",
        "status": job.status,
        "training_file": job.training_file_ref,
        "validation_file": job.validation_file_ref or None,
        "hyperparameters": hyperparameters,
        "method": {"type": method_type, method_type: {"hyperparameters": hyperparameters}},
        "training_type": job.method,
        "fine_tuned_model": job.fine_tuned_model or None,
        "finished_at": unix(job.finished_at),
        "trained_tokens": job.trained_tokens,
        "result_files": [],
        "seed": job.seed,
        "error": job.error,
        "estimated_finish": unix(job.estimated_finish),
        "integrations": job.integrations or [],
        "metadata": job.metadata,
        "user_provided_suffix": job.suffix or None,
        "processes": job.processes,
        "nodes": job.nodes,
        "rendezvous": job.rendezvous or None,
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
        "metrics": {
            "step": checkpoint.step,
            **{name: m.get(name) for name in CHECKPOINT_METRICS},
            **({name: m.get(name) for name in DPO_CHECKPOINT_METRICS} if checkpoint.job.objective == "dpo" else {}),
        },
    }


class JobCreateInput(serializers.Serializer):
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    hyperparameters = HyperparametersField(required=False, allow_null=True)
    method = MethodField(required=False, allow_null=True)
    training_type = serializers.CharField(
        required=False,
        allow_null=True,
        help_text=f"One of {', '.join(METHODS)}; default lora, or the method of the fine-tuned model given as model.",
    )
    holdout_percent = DefinedValue(HOLDOUT_PERCENT)  # the form's name; openai's SDK sends it in extra_body
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=64)
    seed = serializers.IntegerField(required=False, allow_null=True)
    metadata = serializers.JSONField(required=False, allow_null=True)
    # Checked by the service (jobs_app.trackers), which names the exact field of a bad one.
    integrations = serializers.JSONField(
        required=False, allow_null=True, help_text='OpenAI\'s: [{"type": "wandb", "wandb": {"project": ...}}].'
    )
    processes = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="Ours: training processes (torchrun ranks with DDP) on each machine; default FT_TRAIN_PROCESSES.",
    )
    nodes = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="Ours: machines the processes span (default 1, at most FT_TRAIN_MAX_NODES).",
    )
    rendezvous = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="Ours: host:port where the machines meet, an address of the training machine that claims the job; "
        "default its FT_TRAIN_RENDEZVOUS.",
    )
    report_to = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="Ours: experiment trackers, a list of tensorboard, mlflow, wandb (default: the server's FT_REPORT_TO).",
    )


def _method_from(data: dict) -> tuple[str | None, dict | None]:
    """The objective and hyperparameters asked for, from openai's `method` or the older `hyperparameters`.

    zhipuai sends only `hyperparameters`, newer openai `method`: accept either. Without
    a method type the training file decides (preference pairs train dpo).
    """
    method = data.get("method")
    if not method:
        return None, data.get("hyperparameters")
    if not isinstance(method, dict):
        raise ApiError('method must be an object like {"type": "supervised", ...}.', param="method")
    kind = method.get("type")
    if kind is None:  # {"dpo": {...}} says which as well as a type would
        kind = next((name for name in public_names() if name in method), None)
    objective = from_public_name(kind) if isinstance(kind, str) else None
    if kind is not None and objective is None:
        choices = " or ".join(f'"{name}"' for name in public_names())
        raise ApiError(f"method.type {kind!r} is not supported; use {choices}.", param="method.type")
    section = (method.get(kind) or {}) if kind else {}
    if not isinstance(section, dict):
        raise ApiError(f'method.{kind} must be an object like {{"hyperparameters": {{...}}}}.', param=f"method.{kind}")
    return objective, section.get("hyperparameters") or data.get("hyperparameters")


def _owned(request, job_id: str) -> FineTuningJob:
    job = selectors.job_for(request.user, job_id)
    if job is None:
        raise Http404(f"No fine-tuning job with id {job_id!r} was found.")
    return job


class JobListCreate(APIView):
    @extend_schema(
        operation_id="listFineTuningJobs",
        summary="List your fine-tuning jobs, newest first",
        parameters=[*cursor_parameters(), METADATA_FILTER],
        responses={200: JobList, **errors(400)},
    )
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

    @extend_schema(
        operation_id="createFineTuningJob",
        summary="Create a job; it starts once its files are validated",
        request=JobCreateInput,
        responses={200: JobObject, **errors(400, 404)},
    )
    def post(self, request):
        incoming = JobCreateInput(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        objective, hyperparameters = _method_from(data)
        job = services.job_create(
            owner=request.user,
            model=data["model"],
            training_file=data["training_file"],
            validation_file=data.get("validation_file") or None,
            method=(data.get("training_type") or "").lower() or None,
            objective=objective,
            hyperparameters=hyperparameters,
            holdout_percent=data.get("holdout_percent") or 0,
            suffix=data.get("suffix"),
            seed=data.get("seed"),
            metadata=data.get("metadata"),
            integrations=data.get("integrations"),
            report_to=data.get("report_to"),
            processes=data.get("processes"),
            nodes=data.get("nodes"),
            rendezvous=data.get("rendezvous"),
        )
        return Response(job_object(job))


@extend_schema(parameters=[JOB_ID])
class JobDetail(APIView):
    @extend_schema(operation_id="retrieveFineTuningJob", summary="A job", responses={200: JobObject, **errors(404)})
    def get(self, request, job_id):
        return Response(job_object(_owned(request, job_id)))

    @extend_schema(
        operation_id="deleteFineTuningJob",
        summary="zhipuai's delete: a job that is not running (its model stays)",
        responses={200: JobObject, **errors(400, 404)},
    )
    def delete(self, request, job_id):
        return Response(job_object(services.job_delete(job=_owned(request, job_id))))


class JobCancel(APIView):
    @extend_schema(
        operation_id="cancelFineTuningJob",
        summary="Cancel a job that has not finished",
        parameters=[JOB_ID],
        request=None,
        responses={200: JobObject, **errors(400, 404)},
    )
    def post(self, request, job_id):
        return Response(job_object(services.job_cancel(job=_owned(request, job_id))))


class JobPause(APIView):
    @extend_schema(
        operation_id="pauseFineTuningJob",
        summary="Pause a running job at its next checkpoint",
        parameters=[JOB_ID],
        request=None,
        responses={200: JobObject, **errors(400, 404)},
    )
    def post(self, request, job_id):
        return Response(job_object(services.job_pause(job=_owned(request, job_id))))


class JobResume(APIView):
    @extend_schema(
        operation_id="resumeFineTuningJob",
        summary="Resume a paused job from its last checkpoint",
        parameters=[JOB_ID],
        request=None,
        responses={200: JobObject, **errors(400, 404)},
    )
    def post(self, request, job_id):
        return Response(job_object(services.job_resume(job=_owned(request, job_id))))


class JobEvents(APIView):
    @extend_schema(
        operation_id="listFineTuningEvents",
        summary="A job's log lines and metrics points, newest first",
        parameters=[JOB_ID, *cursor_parameters()],
        responses={200: JobEventList, **errors(400, 404)},
    )
    def get(self, request, job_id):
        job = _owned(request, job_id)
        return Response(cursor_page(job.events.all(), request.query_params, to_dict=event_object))


class JobCheckpoints(APIView):
    @extend_schema(
        operation_id="listFineTuningJobCheckpoints",
        summary="A job's kept checkpoints, newest first",
        parameters=[JOB_ID, *cursor_parameters(default_limit=10)],
        responses={200: JobCheckpointList, **errors(400, 404)},
    )
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
