"""The evals API in OpenAI's shape: evals, their runs, and each run's output items."""

from django.http import Http404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.ids import unix
from finetune_site.openapi import MetadataField, cursor_parameters, errors
from finetune_site.pagination import cursor_page

from . import selectors, services
from .api_schema import (
    EVAL_ID,
    ITEM_ID,
    ITEM_STATUS,
    RUN_ID,
    RUN_STATUS,
    DataSourceConfigField,
    DataSourceField,
    EvalDeleted,
    EvalList,
    EvalObject,
    EvalRunList,
    EvalRunObject,
    OutputItemObject,
    OutputItems,
    RunDeleted,
    TestingCriteriaField,
)
from .models import Eval, EvalOutputItem, EvalRun

SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "tools": {"type": "array"},
        "output_text": {"type": "string"},
        "output_tools": {"type": "array"},
    },
    "required": ["model", "choices"],
}


def eval_object(evaluation: Eval) -> dict:
    config = evaluation.data_source_config
    properties = {"item": config.get("item_schema") or {"type": "object"}}
    if config.get("include_sample_schema"):
        properties["sample"] = SAMPLE_SCHEMA
    return {
        "object": "eval",
        "id": evaluation.public_id,
        "name": evaluation.name,
        "data_source_config": {
            "type": "custom",
            "schema": {"type": "object", "properties": properties, "required": list(properties)},
        },
        "testing_criteria": evaluation.testing_criteria,
        "created_at": unix(evaluation.created_at),
        "metadata": evaluation.metadata,
    }


def run_object(run: EvalRun) -> dict:
    counts = run.result_counts or {}
    usage = run.usage or {}
    return {
        "object": "eval.run",
        "id": run.public_id,
        "eval_id": run.eval.public_id,
        "name": run.name,
        "model": run.model,
        "status": run.status,
        "created_at": unix(run.created_at),
        "data_source": {k: v for k, v in run.data_source.items() if k != "limit"},
        "error": run.error,
        "metadata": run.metadata,
        "report_url": reverse("eval_detail", args=[run.eval.public_id]) + f"?run={run.public_id}",
        "result_counts": {name: int(counts.get(name) or 0) for name in ("total", "errored", "failed", "passed")},
        "per_testing_criteria_results": run.per_testing_criteria_results,
        "per_model_usage": [
            {
                "model_name": run.model,
                "invocation_count": int(usage.get("invocation_count") or 0),
                "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "total_tokens": int(usage.get("total_tokens") or 0),
                "cached_tokens": 0,
            }
        ],
        # Ours: how far it is, and per grader the mean with its 95% bootstrap interval.
        "progress": {"done": run.done, "total": run.total},
        "aggregates": run.aggregates,
    }


def output_item_object(item: EvalOutputItem) -> dict:
    run = item.run
    sampling = _sampling_shown(run)
    return {
        "object": "eval.run.output_item",
        "id": item.public_id,
        "run_id": run.public_id,
        "eval_id": run.eval.public_id,
        "created_at": unix(item.created_at),
        "status": item.status,
        "datasource_item_id": item.index,
        "datasource_item": item.item,
        "results": item.results,
        "sample": {
            "input": item.input,
            "output": [
                {
                    "role": "assistant",
                    "content": item.output_text,
                    **({"tool_calls": item.output_tools} if item.output_tools else {}),
                }
            ],
            "finish_reason": item.finish_reason,
            "model": run.model,
            "usage": {
                "prompt_tokens": int(item.usage.get("prompt_tokens") or 0),
                "completion_tokens": int(item.usage.get("completion_tokens") or 0),
                "total_tokens": int(item.usage.get("total_tokens") or 0),
                "cached_tokens": 0,
            },
            "error": {"code": "model_error", "message": item.error} if item.error else None,
            "temperature": sampling["temperature"],
            "max_completion_tokens": sampling["max_tokens"],
            "top_p": sampling.get("top_p", 1.0),
            "seed": sampling.get("seed", 0),
        },
    }


def _sampling_shown(run: EvalRun) -> dict:
    """The run's sampling settings as an output item shows them: as stored, not checked again on a read."""
    params = run.data_source.get("sampling_params") or {}
    return {
        "temperature": params.get("temperature", 0),
        "max_tokens": params.get("max_completion_tokens") or params.get("max_tokens"),
        **{k: params[k] for k in ("top_p", "seed") if params.get(k) is not None},
    }


class EvalCreateInput(serializers.Serializer):
    name = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=200)
    data_source_config = DataSourceConfigField()
    testing_criteria = TestingCriteriaField()
    metadata = MetadataField(required=False, allow_null=True)


class EvalUpdateInput(serializers.Serializer):
    name = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=200)
    metadata = MetadataField(required=False, allow_null=True)


class RunCreateInput(serializers.Serializer):
    name = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=200)
    data_source = DataSourceField()
    metadata = MetadataField(required=False, allow_null=True)


def _eval(request, eval_id: str) -> Eval:
    evaluation = selectors.eval_for(request.user, eval_id)
    if evaluation is None:
        raise Http404(f"No eval with id {eval_id!r} was found.")
    return evaluation


def _run(request, eval_id: str, run_id: str) -> EvalRun:
    run = selectors.run_for(_eval(request, eval_id), run_id)
    if run is None:
        raise Http404(f"No run with id {run_id!r} was found in eval {eval_id!r}.")
    return run


class EvalListCreate(APIView):
    @extend_schema(
        operation_id="listEvals",
        summary="List your evals, newest first",
        parameters=cursor_parameters(),
        responses={200: EvalList, **errors(400)},
    )
    def get(self, request):
        return Response(cursor_page(selectors.evals_for(request.user), request.query_params, to_dict=eval_object))

    @extend_schema(
        operation_id="createEval",
        summary="Create an eval: the data's shape and its graders",
        request=EvalCreateInput,
        responses={200: EvalObject, **errors(400)},
    )
    def post(self, request):
        incoming = EvalCreateInput(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        evaluation = services.eval_create(
            owner=request.user,
            name=data.get("name") or "",
            data_source_config=data["data_source_config"],
            testing_criteria=data["testing_criteria"],
            metadata=data.get("metadata"),
        )
        return Response(eval_object(evaluation))


@extend_schema(parameters=[EVAL_ID])
class EvalDetail(APIView):
    @extend_schema(operation_id="getEval", summary="An eval", responses={200: EvalObject, **errors(404)})
    def get(self, request, eval_id):
        return Response(eval_object(_eval(request, eval_id)))

    @extend_schema(
        operation_id="updateEval",
        summary="Rename an eval or replace its metadata",
        request=EvalUpdateInput,
        responses={200: EvalObject, **errors(400, 404)},
    )
    def post(self, request, eval_id):
        """Rename it or replace its metadata (OpenAI's update)."""
        incoming = EvalUpdateInput(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        evaluation = services.eval_update(
            evaluation=_eval(request, eval_id), name=data.get("name"), metadata=data.get("metadata")
        )
        return Response(eval_object(evaluation))

    @extend_schema(
        operation_id="deleteEval",
        summary="Delete an eval and its runs",
        responses={200: EvalDeleted, **errors(400, 404)},
    )
    def delete(self, request, eval_id):
        evaluation = _eval(request, eval_id)
        services.eval_delete(evaluation=evaluation)
        return Response({"object": "eval.deleted", "deleted": True, "eval_id": eval_id})


@extend_schema(parameters=[EVAL_ID])
class RunListCreate(APIView):
    @extend_schema(
        operation_id="getEvalRuns",
        summary="An eval's runs, newest first",
        parameters=[*cursor_parameters(), RUN_STATUS],
        responses={200: EvalRunList, **errors(400, 404)},
    )
    def get(self, request, eval_id):
        runs = _eval(request, eval_id).runs.select_related("eval")
        if request.query_params.get("status"):
            runs = runs.filter(status=request.query_params["status"])
        return Response(cursor_page(runs, request.query_params, to_dict=run_object))

    @extend_schema(
        operation_id="createEvalRun",
        summary="Run a model over the eval's data; it is answered and graded in the background",
        request=RunCreateInput,
        responses={200: EvalRunObject, **errors(400, 404)},
    )
    def post(self, request, eval_id):
        incoming = RunCreateInput(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        run = services.run_create(
            evaluation=_eval(request, eval_id),
            data_source=data["data_source"],
            name=data.get("name") or "",
            metadata=data.get("metadata"),
        )
        return Response(run_object(run))


@extend_schema(parameters=[EVAL_ID, RUN_ID])
class RunDetail(APIView):
    @extend_schema(operation_id="getEvalRun", summary="A run", responses={200: EvalRunObject, **errors(404)})
    def get(self, request, eval_id, run_id):
        return Response(run_object(_run(request, eval_id, run_id)))

    @extend_schema(
        operation_id="cancelEvalRunByPost",
        summary="Cancel a run (the REST reference's spelling)",
        request=None,
        responses={200: EvalRunObject, **errors(400, 404)},
    )
    def post(self, request, eval_id, run_id):
        """Cancel, as OpenAI's REST reference has it (the SDK posts to .../cancel)."""
        return Response(run_object(services.run_cancel(run=_run(request, eval_id, run_id))))

    @extend_schema(
        operation_id="deleteEvalRun", summary="Delete a run", responses={200: RunDeleted, **errors(400, 404)}
    )
    def delete(self, request, eval_id, run_id):
        run = _run(request, eval_id, run_id)
        services.run_delete(run=run)
        return Response({"object": "eval.run.deleted", "deleted": True, "run_id": run_id})


class RunCancel(APIView):
    @extend_schema(
        operation_id="cancelEvalRun",
        summary="Cancel a run (the SDK's spelling)",
        parameters=[EVAL_ID, RUN_ID],
        request=None,
        responses={200: EvalRunObject, **errors(400, 404)},
    )
    def post(self, request, eval_id, run_id):
        return Response(run_object(services.run_cancel(run=_run(request, eval_id, run_id))))


class RunResume(APIView):
    @extend_schema(
        operation_id="resumeEvalRun",
        summary="Ours: resume a canceled or failed run; only what is left is answered",
        parameters=[EVAL_ID, RUN_ID],
        request=None,
        responses={200: EvalRunObject, **errors(400, 404)},
    )
    def post(self, request, eval_id, run_id):
        return Response(run_object(services.run_resume(run=_run(request, eval_id, run_id))))


class OutputItemList(APIView):
    @extend_schema(
        operation_id="getEvalRunOutputItems",
        summary="A run's answers with their grades",
        parameters=[EVAL_ID, RUN_ID, *cursor_parameters(), ITEM_STATUS],
        responses={200: OutputItems, **errors(400, 404)},
    )
    def get(self, request, eval_id, run_id):
        run = _run(request, eval_id, run_id)
        rows = run.items.select_related("run__eval")
        if request.query_params.get("status"):
            rows = rows.filter(status=request.query_params["status"])
        return Response(cursor_page(rows, request.query_params, to_dict=output_item_object))


class OutputItemDetail(APIView):
    @extend_schema(
        operation_id="getEvalRunOutputItem",
        summary="One answer with its grades",
        parameters=[EVAL_ID, RUN_ID, ITEM_ID],
        responses={200: OutputItemObject, **errors(404)},
    )
    def get(self, request, eval_id, run_id, item_id):
        item = _run(request, eval_id, run_id).items.select_related("run__eval").filter(public_id=item_id).first()
        if item is None:
            raise Http404(f"No output item with id {item_id!r} was found.")
        return Response(output_item_object(item))
