"""Deployments API: create, list, retrieve, scale (PATCH) and cancel (DELETE)."""

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.ids import unix
from finetune_site.openapi import Choice, Const, cursor_parameters, errors, path_parameter
from finetune_site.pagination import cursor_page
from llm.serve.vllm import BACKENDS

from ..models import Deployment, Instance
from . import selectors, services


class DeploymentCreateInput(serializers.Serializer):
    model = serializers.CharField(help_text="A base, fine-tuned or checkpoint model id.")
    instances = serializers.IntegerField(default=1)
    max_concurrent_requests = serializers.IntegerField(
        default=16, help_text="Requests one instance takes at once (its engine answers them in shared batches)."
    )
    backend = serializers.ChoiceField(
        BACKENDS,
        required=False,
        help_text="What serves the instances: vllm (a vLLM server per instance), embedded (this product's engine), "
        "or auto (vLLM where installed and the model is supported). Default: the server's FT_SERVING_BACKEND.",
    )
    tensor_parallel_size = serializers.IntegerField(
        default=1, help_text="GPUs each instance spreads the model over (vLLM on GPU machines)."
    )


class DeploymentScaleInput(serializers.Serializer):
    instances = serializers.IntegerField()


class InstanceOutput(serializers.Serializer):
    id = serializers.CharField()
    object = Const("deployment.instance")
    status = Choice([s for s, _ in Instance.STATUS_CHOICES])
    backend = serializers.CharField(help_text="What serves it: embedded or vllm (empty until the instance starts).")
    worker = serializers.CharField()
    pid = serializers.IntegerField(allow_null=True, help_text="The instance process's id on its worker's host.")
    requests_served = serializers.IntegerField()
    tokens_generated = serializers.IntegerField()
    tokens_per_second = serializers.FloatField(allow_null=True)
    latency_p50_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(allow_null=True)
    errors = serializers.IntegerField()
    queue_depth = serializers.IntegerField(help_text="Requests waiting to join the running batch (last heartbeat).")
    running_requests = serializers.IntegerField(help_text="Rows in the running batch (last heartbeat).")
    recent_tokens_per_second = serializers.FloatField(help_text="Tokens generated per second over the last 10 s.")
    first_token_p50_ms = serializers.FloatField(allow_null=True)
    first_token_p95_ms = serializers.FloatField(allow_null=True)
    created_at = serializers.IntegerField()
    started_at = serializers.IntegerField(allow_null=True)
    stopped_at = serializers.IntegerField(allow_null=True)
    heartbeat_at = serializers.IntegerField(allow_null=True)
    detail = serializers.CharField()


class DeploymentOutput(serializers.Serializer):
    id = serializers.CharField()
    object = Const("deployment")
    model = serializers.CharField()
    status = Choice([s for s, _ in Deployment.STATUS_CHOICES])
    instances = serializers.IntegerField(help_text="How many instances are wanted.")
    running_instances = serializers.IntegerField()
    max_concurrent_requests = serializers.IntegerField()
    backend = serializers.CharField(help_text="The backend asked for (auto, embedded or vllm; empty: the server's).")
    tensor_parallel_size = serializers.IntegerField()
    requests_served = serializers.IntegerField()
    tokens_generated = serializers.IntegerField()
    instance_hours = serializers.FloatField()
    estimated_cost = serializers.FloatField()
    error = serializers.CharField(allow_null=True)
    created_at = serializers.IntegerField()
    finished_at = serializers.IntegerField(allow_null=True)
    instance_list = InstanceOutput(many=True)


class DeploymentListOutput(serializers.Serializer):
    """A page of deployments, newest first; pass `last_id` as `after` for the next page."""

    object = Const("list")
    data = DeploymentOutput(many=True)
    has_more = serializers.BooleanField()
    first_id = serializers.CharField(allow_null=True)
    last_id = serializers.CharField(allow_null=True)


DEPLOYMENT_ID = path_parameter("deployment_id", "A deployment id.")


def instance_object(instance: Instance) -> dict:
    return {
        "id": instance.public_id,
        "object": "deployment.instance",
        "status": instance.status,
        "backend": instance.backend,
        "worker": instance.worker,
        "pid": instance.pid,
        "requests_served": instance.requests_served,
        "tokens_generated": instance.tokens_generated,
        "tokens_per_second": instance.tokens_per_second,
        "latency_p50_ms": instance.latency_p50_ms,
        "latency_p95_ms": instance.latency_p95_ms,
        "errors": instance.errors,
        "queue_depth": instance.queue_depth,
        "running_requests": instance.running_requests,
        "recent_tokens_per_second": instance.recent_tokens_per_second,
        "first_token_p50_ms": instance.first_token_p50_ms,
        "first_token_p95_ms": instance.first_token_p95_ms,
        "created_at": unix(instance.created_at),
        "started_at": unix(instance.started_at),
        "stopped_at": unix(instance.stopped_at),
        "heartbeat_at": unix(instance.heartbeat_at),
        "detail": instance.detail,
    }


def deployment_object(deployment: Deployment) -> dict:
    instances = list(deployment.instance_set.all())
    usage = selectors.deployment_usage(deployment, instances)
    return {
        "id": deployment.public_id,
        "object": "deployment",
        "model": deployment.model_id,
        "status": deployment.status,
        "instances": deployment.instances,
        "running_instances": usage["running_instances"],
        "max_concurrent_requests": deployment.max_concurrent_requests,
        "backend": deployment.backend,
        "tensor_parallel_size": deployment.tensor_parallel_size,
        "requests_served": usage["requests_served"],
        "tokens_generated": usage["tokens_generated"],
        "instance_hours": round(usage["instance_hours"], 6),
        "estimated_cost": round(usage["estimated_cost"], 6),
        "error": deployment.error or None,
        "created_at": unix(deployment.created_at),
        "finished_at": unix(deployment.finished_at),
        "instance_list": [instance_object(i) for i in instances],
    }


def _deployment(request, deployment_id: str) -> Deployment:
    deployment = selectors.deployment_for(request.user, deployment_id)
    if deployment is None:
        raise Http404(f"No deployment {deployment_id!r}.")
    return deployment


class DeploymentListCreate(APIView):
    @extend_schema(
        operation_id="listDeployments",
        summary="List your deployments, newest first",
        parameters=cursor_parameters(),
        responses={200: DeploymentListOutput, **errors(400)},
    )
    def get(self, request):
        page = cursor_page(
            selectors.deployments_for(request.user).prefetch_related("instance_set"),
            request.query_params,
            to_dict=deployment_object,
        )
        return Response(page)

    @extend_schema(
        operation_id="createDeployment",
        summary="Deploy a model on N instances",
        request=DeploymentCreateInput,
        responses={200: DeploymentOutput, **errors(400, 404)},
    )
    def post(self, request):
        data = DeploymentCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = services.deployment_create(
            user=request.user,
            model_id=data.validated_data["model"],
            instances=data.validated_data["instances"],
            max_concurrent_requests=data.validated_data["max_concurrent_requests"],
            backend=data.validated_data.get("backend", ""),
            tensor_parallel_size=data.validated_data["tensor_parallel_size"],
        )
        return Response(deployment_object(deployment))


@extend_schema(parameters=[DEPLOYMENT_ID])
class DeploymentDetail(APIView):
    @extend_schema(
        operation_id="retrieveDeployment",
        summary="A deployment with its instances and usage",
        responses={200: DeploymentOutput, **errors(404)},
    )
    def get(self, request, deployment_id):
        return Response(deployment_object(_deployment(request, deployment_id)))

    @extend_schema(
        operation_id="scaleDeployment",
        summary="Scale: change the number of instances",
        request=DeploymentScaleInput,
        responses={200: DeploymentOutput, **errors(400, 404)},
    )
    def patch(self, request, deployment_id):
        data = DeploymentScaleInput(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = services.deployment_scale(
            deployment=_deployment(request, deployment_id), instances=data.validated_data["instances"]
        )
        return Response(deployment_object(deployment))

    @extend_schema(
        operation_id="cancelDeployment",
        summary="Cancel: stop every instance and free its memory",
        request=None,
        responses={200: DeploymentOutput, **errors(400, 404)},
    )
    def delete(self, request, deployment_id):
        deployment = services.deployment_cancel(deployment=_deployment(request, deployment_id))
        return Response(deployment_object(deployment))
