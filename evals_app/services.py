"""Evaluations: create one, start runs, answer and grade every example on a worker, aggregate.

A run's answers come from the serving path chat uses (`open_events`): the model's deployment
when it has one, else the serving engine's pool of the process running the run (the evaluations
worker's own, a second copy of the weights beside the web's). Up to FT_EVAL_CONCURRENCY requests
are in flight at once, so that engine answers them in the same forward passes. Grading runs in threads
beside it; a judge grader asks its model through the same path. Nothing here runs on the web
server's event loop.
"""

import asyncio
import itertools
import logging
from contextlib import aclosing
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, close_old_connections, transaction
from django.db.models import F
from django.utils import timezone

from deployments_app.catalog import resolve_model
from deployments_app.chat import protocol
from deployments_app.chat.serving import open_events
from finetune_site.api_errors import ApiError
from finetune_site.broker import send_task, waiting_task_args
from finetune_site.errors import ApplicationError, Busy, InvalidInput, InvalidState, NotFound
from finetune_site.metadata import check_metadata
from llm.evals.graders import GraderError, Sample, check_criteria, grade, judge_models
from llm.evals.stats import is_label_task, label_summary, mean_interval
from llm.evals.templates import MissingField
from llm.serve.schema import Completion

from . import items as run_items
from .models import Eval, EvalOutputItem, EvalRun

log = logging.getLogger(__name__)

WATCH_SECONDS = 1.0
"""How often a running run heartbeats and looks for a cancel."""
SUMMARY_EVERY_SECONDS = 5
STALE_RUN_SECONDS = 120
"""A run in progress whose worker has not written for this long is taken to be lost and queued again."""
LOST_QUEUED_SECONDS = 300
MAX_RUN_ATTEMPTS = 3
"""A run whose worker dies this many times in all (out of memory on it, say) fails instead of being queued
again; each resume gives it one more try."""
BUSY_RETRIES = 20


# --- Creating ---------------------------------------------------------------------


def eval_create(
    *, owner, name: str = "", data_source_config, testing_criteria, metadata=None, kind=Eval.USER, job=None
):
    """Check the graders against the data's fields and the judges against the models the owner may use."""
    config = _data_source_config(data_source_config)
    check_metadata(metadata)
    properties = (config.get("item_schema") or {}).get("properties")
    item_fields = set(properties) if isinstance(properties, dict) else None
    try:
        check_criteria(testing_criteria, item_fields)
    except GraderError as exc:
        raise InvalidInput(str(exc), param=exc.path) from exc
    for index, model in _judges(testing_criteria):
        if resolve_model(owner, model) is None:
            raise InvalidInput(
                f"The judge model {model!r} does not exist or you do not have access to it.",
                param=f"testing_criteria[{index}].model",
                code="model_not_found",
            )
    return Eval.objects.create(
        owner=owner,
        name=name or "",
        data_source_config=config,
        testing_criteria=testing_criteria,
        metadata=metadata,
        kind=kind,
        job=job,
    )


def _judges(criteria) -> list[tuple[int, str]]:
    return [(index, model) for index, spec in enumerate(criteria) for model in judge_models([spec])]


def _data_source_config(config) -> dict:
    if not isinstance(config, dict) or config.get("type") not in ("custom", "chat"):
        raise InvalidInput(
            'data_source_config must be {"type": "custom", "item_schema": {...}}; '
            '{"type": "chat"} takes the fields of a chat fine-tuning file.',
            param="data_source_config.type",
        )
    if config["type"] == "chat":  # ours: items made from chat examples (items.CHAT_ITEM_FIELDS)
        return {"type": "custom", "item_schema": run_items.CHAT_ITEM_SCHEMA, "include_sample_schema": True}
    schema = config.get("item_schema")
    if not isinstance(schema, dict):
        raise InvalidInput(
            "data_source_config.item_schema must be a JSON schema object.", param="data_source_config.item_schema"
        )
    return {"type": "custom", "item_schema": schema, "include_sample_schema": bool(config.get("include_sample_schema"))}


def run_create(
    *, evaluation: Eval, data_source, name: str = "", metadata=None, limit: int | None = None, examples=None
) -> EvalRun:
    """Check the data source now (model, file, messages), then queue the run on the evaluations worker."""
    owner = evaluation.owner
    if not isinstance(data_source, dict) or data_source.get("type") not in ("completions", "jsonl"):
        raise InvalidInput(
            'data_source must be {"type": "completions", "model": ..., "source": {"type": "file_id", "id": ...}}.',
            param="data_source.type",
        )
    model = data_source.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("data_source.model is required: the model that answers.", param="data_source.model")
    if resolve_model(owner, model) is None:
        raise NotFound(
            f"The model {model!r} does not exist or you do not have access to it.",
            param="data_source.model",
            code="model_not_found",
        )
    source = data_source.get("source")
    if (
        not isinstance(source, dict)
        or source.get("type") not in ("file_id", "file_content")
        or (source["type"] == "file_content" and not isinstance(source.get("content"), list))
    ):
        raise InvalidInput(
            'data_source.source must be {"type": "file_id", "id": ...} or {"type": "file_content", "content": [...]}.',
            param="data_source.source",
        )
    _check_input_messages(data_source.get("input_messages"))
    if examples is None:  # callers queueing several models over one source read it once and pass it
        examples = run_items.read_items(owner, data_source, limit=limit)
    input_messages = data_source.get("input_messages")
    try:
        run_items.messages_for(examples[0], input_messages)
    except (MissingField, ValueError) as exc:
        raise InvalidInput(
            f"The first example has no messages to send: {exc}", param="data_source.input_messages"
        ) from exc
    sampling_of(data_source)  # refuse bad sampling parameters now, not on every example
    stored = {**data_source, **({"limit": limit} if limit else {})}
    run = EvalRun.objects.create(
        eval=evaluation,
        owner=owner,
        name=name or model,
        model=model,
        data_source=stored,
        metadata=metadata,
        total=len(examples),
    )
    transaction.on_commit(lambda: _enqueue(run.pk))
    return run


def eval_update(*, evaluation: Eval, name=None, metadata=None) -> Eval:
    if name is not None:
        if not isinstance(name, str) or len(name) > 200:
            raise InvalidInput("name must be a string of at most 200 characters.", param="name")
        evaluation.name = name
    if metadata is not None:
        check_metadata(metadata)
        evaluation.metadata = metadata
    evaluation.save(update_fields=["name", "metadata"])
    return evaluation


def eval_delete(*, evaluation: Eval) -> None:
    """Stop its running runs (their workers see the rows gone), then delete it with every answer."""
    for run in evaluation.runs.filter(status__in=EvalRun.ACTIVE_STATUSES):
        run_cancel(run=run)
    evaluation.delete()


def run_delete(*, run: EvalRun) -> None:
    run_cancel(run=run)
    run.delete()


def _check_input_messages(spec) -> None:
    template = spec.get("template") if isinstance(spec, dict) else None
    if spec is None or (
        isinstance(spec, dict)
        and (
            (spec.get("type") == "item_reference" and isinstance(spec.get("item_reference"), str))
            or (
                spec.get("type") == "template"
                and isinstance(template, list)
                and all(isinstance(m, dict) for m in template)
            )
        )
    ):
        return
    raise InvalidInput(
        'input_messages must be {"type": "template", "template": [{"role", "content"}, ...]} '
        'or {"type": "item_reference", "item_reference": "item.<field>"}.',
        param="data_source.input_messages",
    )


def _enqueue(run_pk: int) -> None:
    from .tasks import run_eval  # tasks imports this module

    send_task(run_eval, run_pk)


def run_cancel(*, run: EvalRun) -> EvalRun:
    """A queued run stops at once; a running one within a second (its worker sees `control`).

    Both writes go by the row's state now, not as it was read: a worker may claim it in between.
    """
    if not EvalRun.objects.filter(pk=run.pk, status=EvalRun.QUEUED).update(
        status=EvalRun.CANCELED, finished_at=timezone.now()
    ):
        EvalRun.objects.filter(pk=run.pk, status=EvalRun.IN_PROGRESS).update(control="cancel")
    run.refresh_from_db()
    return run


def run_resume(*, run: EvalRun) -> EvalRun:
    """Queue a cancelled or failed run again: the examples it already answered are kept."""
    if run.status not in (EvalRun.CANCELED, EvalRun.FAILED):
        raise InvalidState(f"The run is {run.status}; only a canceled or failed run can be resumed.")
    if EvalRun.objects.filter(pk=run.pk, status__in=(EvalRun.CANCELED, EvalRun.FAILED)).update(
        status=EvalRun.QUEUED, control="", error=None, finished_at=None
    ):  # attempts go on counting: a worker of an earlier attempt, still alive, must never match the new one
        transaction.on_commit(lambda: _enqueue(run.pk))
    run.refresh_from_db()
    return run


# --- Running ---------------------------------------------------------------------


def run_execute(*, run_id: int) -> None:
    """The task: claim the run, answer and grade each example not yet done, then aggregate.

    The claim's attempt number fences the run: every later write of this worker carries it, so a
    worker that lost the run (the sweep queued it again after it went quiet) changes nothing.
    """
    now = timezone.now()
    claimed = EvalRun.objects.filter(pk=run_id, status=EvalRun.QUEUED).update(
        status=EvalRun.IN_PROGRESS, started_at=now, heartbeat_at=now, attempts=F("attempts") + 1
    )
    if not claimed:
        return
    run = EvalRun.objects.select_related("eval", "owner").get(pk=run_id)
    try:
        examples = run_items.read_items(run.owner, run.data_source, limit=run.data_source.get("limit"))
        done = set(run.items.values_list("index", flat=True))
        pending = [(index, item) for index, item in enumerate(examples) if index not in done]
        _mine(run).update(total=len(examples))
        outcome = asyncio.run(_Executor(run).answer_all(pending))
        if outcome != _LOST:
            _finish(run, EvalRun.CANCELED if outcome == _CANCELLED else EvalRun.COMPLETED)
    except ApplicationError as exc:
        _finish(run, EvalRun.FAILED, error={"code": exc.code or "invalid_data_source", "message": exc.message})
    except Exception as exc:
        log.exception("evaluation run %s failed", run.public_id)
        _finish(run, EvalRun.FAILED, error={"code": "run_failed", "message": f"{type(exc).__name__}: {exc}"})


_DONE, _CANCELLED, _LOST = "done", "cancelled", "lost"


def _mine(run: EvalRun):
    """The run's row while this worker still holds it (in progress, under the attempt it claimed)."""
    return EvalRun.objects.filter(pk=run.pk, status=EvalRun.IN_PROGRESS, attempts=run.attempts)


def _write_summary(run: EvalRun) -> None:
    _mine(run).update(**run_summary(run))


def _finish(run: EvalRun, status: str, error: dict | None = None) -> None:
    try:
        summary = run_summary(run)
    except Exception:  # the status must still be written, or the run would be taken for lost and redone
        log.exception("evaluation run %s: its totals could not be computed", run.public_id)
        summary = {}
    _mine(run).update(status=status, control="", error=error, finished_at=timezone.now(), **summary)


class _Executor:
    """One run's answers: a bounded number in flight, each graded as it arrives, checked for cancel."""

    def __init__(self, run: EvalRun):
        self.run = run
        self.criteria = run.eval.testing_criteria
        self.body = sampling_of(run.data_source)
        self.input_messages = run.data_source.get("input_messages")
        self.outcome = _DONE
        self.loop: asyncio.AbstractEventLoop | None = None

    async def answer_all(self, pending: list[tuple[int, dict]]) -> str:
        """_DONE, _CANCELLED (asked to stop) or _LOST (the run is no longer this worker's)."""
        self.loop = asyncio.get_running_loop()
        # The database work of this loop runs in asgiref's one shared thread, whose connection
        # outlives the task: drop it if the database went away since the last run.
        await sync_to_async(close_old_connections)()
        slots = asyncio.Semaphore(settings.FT_EVAL_CONCURRENCY)

        async def one(index: int, item: dict) -> None:
            async with slots:
                await self._answer_and_grade(index, item)

        tasks = [asyncio.create_task(one(index, item)) for index, item in pending]
        watcher = asyncio.create_task(self._watch(tasks))
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            watcher.cancel()
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # its heartbeat failed: the answers were stopped with it
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return self.outcome

    async def _watch(self, tasks: list[asyncio.Task]) -> None:
        """Each second: heartbeat and look for a cancel; every few, the totals so far for the live page.

        A cancel stops the answers in flight too (the engine stops generating them); they are not
        saved, so a resume asks them again.
        """
        try:
            for tick in itertools.count(1):
                await asyncio.sleep(WATCH_SECONDS)
                self.outcome = await sync_to_async(_heartbeat)(self.run)
                if self.outcome != _DONE:
                    break
                if tick % max(1, round(SUMMARY_EVERY_SECONDS / WATCH_SECONDS)) == 0:
                    await sync_to_async(_write_summary)(self.run)
        finally:  # asked to stop, the run lost, or the heartbeat failed: no answer goes on unwatched
            for task in tasks:
                task.cancel()  # a task already done ignores it

    async def _answer_and_grade(self, index: int, item: dict) -> None:
        output = {"input": [], "output_text": "", "output_tools": [], "finish_reason": "", "error": "", "usage": {}}
        try:
            messages = run_items.messages_for(item, self.input_messages)
            output["input"] = messages
            output.update(await self._answer(self.run.model, messages, item.get("tools"), self.body))
        except (MissingField, ValueError) as exc:
            output["error"] = f"no messages to send: {exc}"
        results = []
        if not output["error"]:
            sample = Sample(output_text=output["output_text"], output_tools=output["output_tools"])
            results = await asyncio.to_thread(self._grade_all, item, sample)
        status = _status_of(output["error"], results)
        await sync_to_async(_save_item)(self.run, index, item, output, results, status)

    def _grade_all(self, item: dict, sample: Sample) -> list[dict]:
        return [grade(spec, item, sample, self._judge).as_dict() for spec in self.criteria]

    def _judge(self, model: str, messages: list, sampling_params: dict) -> str:
        """A judge grader's question, asked from a grading thread through the run's event loop."""
        body = sampling_of({"sampling_params": sampling_params})  # greedy unless the grader gives a temperature
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(self._answer(model, messages, None, body), self.loop)
        answer = future.result(timeout=600)
        if answer["error"]:
            raise RuntimeError(answer["error"])
        return answer["output_text"]

    async def _answer(self, model: str, messages: list, tools, body: dict) -> dict:
        request = {**body, "model": model, "messages": messages, **({"tools": tools} if tools else {})}
        for attempt in range(BUSY_RETRIES):
            try:
                params = protocol.parse_chat_body(request)
                events = await open_events(self.run.owner, params)
                completion = None
                async with aclosing(events):  # cancelled: the engine stops this answer
                    async for event in events:
                        if isinstance(event, Completion):
                            completion = event
                if completion is None:
                    return _failed("the model returned no answer")
                return {
                    "output_text": completion.content or "",
                    "output_tools": list(completion.tool_calls or []),
                    "finish_reason": completion.finish_reason or "",
                    "error": "",
                    "usage": {
                        "prompt_tokens": completion.prompt_tokens,
                        "completion_tokens": completion.completion_tokens,
                        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
                    },
                }
            except Busy as exc:  # the engine is full: wait as it asks, then try again
                await asyncio.sleep(min(float(exc.retry_after or 1), 10) * (1 + attempt / 4))
            except ApiError as exc:
                return _failed(str(exc.detail))
            except ApplicationError as exc:
                return _failed(exc.message)
            except Exception as exc:  # noqa: BLE001 - one failed example must not end the run
                return _failed(f"{type(exc).__name__}: {exc}")
        return _failed("the model stayed busy")


def _failed(message: str) -> dict:
    return {"output_text": "", "output_tools": [], "finish_reason": "", "error": message, "usage": {}}


def sampling_of(data_source: dict) -> dict:
    """The chat request fields of OpenAI's sampling_params; greedy unless a temperature is given."""
    params = data_source.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise InvalidInput("sampling_params must be an object.", param="data_source.sampling_params")
    body = {
        # Graders' sampling_params spell it max_completions_tokens in OpenAI's reference.
        "max_tokens": params.get("max_completion_tokens")
        or params.get("max_completions_tokens")
        or params.get("max_tokens")
        or settings.FT_EVAL_MAX_TOKENS,
        "temperature": params.get("temperature", 0),
    }
    for name in ("top_p", "seed", "stop"):
        if params.get(name) is not None:
            body[name] = params[name]
    try:
        protocol.parse_chat_body({**body, "model": "check", "messages": [{"role": "user", "content": "x"}]})
    except ApiError as exc:
        raise InvalidInput(str(exc.detail), param=f"data_source.sampling_params.{exc.param or ''}".rstrip(".")) from exc
    return body


def _heartbeat(run: EvalRun) -> str:
    """_DONE to go on, _CANCELLED when asked to stop, _LOST when the row is gone or no longer this worker's."""
    if not _mine(run).update(heartbeat_at=timezone.now()):
        return _LOST
    return _CANCELLED if _mine(run).filter(control="cancel").exists() else _DONE


def _status_of(error: str, results: list[dict]) -> str:
    if error or any(r.get("error") for r in results):
        return EvalOutputItem.ERROR
    return EvalOutputItem.PASS if all(r.get("passed") for r in results) else EvalOutputItem.FAIL


def _save_item(run: EvalRun, index: int, item: dict, output: dict, results: list, status: str) -> None:
    try:
        _, created = EvalOutputItem.objects.update_or_create(
            run=run, index=index, defaults={"item": item, "results": results, "status": status, **output}
        )
    except IntegrityError:  # the run was deleted while this answer was on its way
        return
    if created:
        _mine(run).update(done=F("done") + 1, heartbeat_at=timezone.now())


# --- Aggregating -------------------------------------------------------------------


def run_summary(run: EvalRun) -> dict:
    """OpenAI's result counts and per-criterion totals, and per grader a mean with its 95% interval."""
    rows = list(run.items.values_list("status", "results", "usage"))
    counts = {"total": len(rows), "passed": 0, "failed": 0, "errored": 0}
    for status, _, _ in rows:
        counts[{"pass": "passed", "fail": "failed"}.get(status, "errored")] += 1
    per_criterion = []
    aggregates = {}
    for position, spec in enumerate(run.eval.testing_criteria):
        name = spec.get("name") or f"grader_{position}"
        results = [r[position] for _, r, _ in rows if len(r) > position]
        scored = [r for r in results if not r.get("error")]
        passed = sum(1 for r in scored if r.get("passed"))
        per_criterion.append({"testing_criteria": name, "passed": passed, "failed": len(scored) - passed})
        aggregate = {
            "type": spec.get("type"),
            **mean_interval([float(r["score"]) for r in scored]),
            "pass_rate": passed / len(scored) if scored else None,
            "errors": len(results) - len(scored),
        }
        labels = _label_pairs(spec, scored)
        if labels is not None:
            aggregate["labels"] = label_summary(labels)
        aggregates[name] = aggregate
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "invocation_count": 0}
    for _, _, used in rows:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[key] += int((used or {}).get(key) or 0)
        usage["invocation_count"] += 1 if used else 0
    return {
        "result_counts": counts,
        "per_testing_criteria_results": per_criterion,
        "aggregates": aggregates,
        "usage": usage,
    }


def _label_pairs(spec: dict, scored: list[dict]) -> list[tuple[str, str]] | None:
    """(reference, answer) pairs when an exact-match grader's references look like class labels."""
    if spec.get("type") != "string_check" or spec.get("operation") != "eq":
        return None
    pairs = [
        (str(r["detail"].get("reference", "")).strip(), str(r["detail"].get("input", "")).strip())
        for r in scored
        if isinstance(r.get("detail"), dict)
    ]
    return pairs if pairs and is_label_task([reference for reference, _ in pairs]) else None


# --- Recovery ----------------------------------------------------------------------


def reconcile_runs() -> list[str]:
    """Queue again the runs whose worker went quiet, and the queued runs whose message was lost."""
    from .tasks import run_eval  # tasks imports this module

    now = timezone.now()
    quiet_since = now - timedelta(seconds=STALE_RUN_SECONDS)
    sent: dict[int, str] = {}
    stale = list(
        EvalRun.objects.filter(status=EvalRun.IN_PROGRESS, heartbeat_at__lt=quiet_since).values_list("pk", "public_id")
    )
    for pk, public_id in stale:
        # Each only if still quiet: the worker may have written meanwhile.
        still_quiet = EvalRun.objects.filter(pk=pk, status=EvalRun.IN_PROGRESS, heartbeat_at__lt=quiet_since)
        ended = {"control": "", "finished_at": now}
        if still_quiet.filter(control="cancel").update(status=EvalRun.CANCELED, **ended):
            continue  # its user asked it to stop: it stays stopped, and a resume goes on from its answers
        if still_quiet.filter(attempts__gte=MAX_RUN_ATTEMPTS).update(
            status=EvalRun.FAILED,
            error={
                "code": "run_failed",
                "message": f"Its worker stopped responding {MAX_RUN_ATTEMPTS} times or more, so it is not queued "
                "again; resume it to try once more.",
            },
            **ended,
        ):
            log.warning("evaluation run %s lost its worker %d times: failed", public_id, MAX_RUN_ATTEMPTS)
            continue
        if still_quiet.update(status=EvalRun.QUEUED, control=""):
            log.warning("evaluation run %s went quiet: queued again", public_id)
            sent[pk] = public_id
    lost_after = timedelta(seconds=LOST_QUEUED_SECONDS)
    queued = list(
        EvalRun.objects.filter(status=EvalRun.QUEUED, created_at__lt=now - lost_after)
        .exclude(pk__in=list(sent))
        .values_list("pk", "public_id")
    )
    if queued:
        in_queue = {
            args[0] for args in waiting_task_args(run_eval.name, reserved_within=lost_after.total_seconds()) if args
        }
        for pk, public_id in queued:
            if pk not in in_queue:
                log.warning("evaluation run %s is queued but its task is in no queue: sending it again", public_id)
                sent[pk] = public_id
    for pk in sent:
        _enqueue(pk)
    return list(sent.values())
