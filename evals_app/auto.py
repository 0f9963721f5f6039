"""Automatic evaluation at a job's end: the tuned model (and each checkpoint) against the model it
started from on the job's held-out data, and the forgetting check on the general set shipped in
`general/` (see its README).

Nothing here may fail the job: every problem is logged and the job's success stands.
"""

import json
import logging
from functools import cache
from pathlib import Path

from django.conf import settings
from django.db import transaction

from finetune_site.errors import ApplicationError
from jobs_app.models import FineTuningJob
from llm.evals.graders import CONTAINS, default_criteria

from . import items as run_items
from . import services
from .models import Eval
from .summaries import BASE, CHECKPOINT, TUNED

log = logging.getLogger(__name__)

GENERAL_SET = Path(__file__).parent / "general" / "general_v1.jsonl"
GENERAL_CRITERIA = [{**CONTAINS, "name": "contains_answer"}]
"""The general set's answers are graded as "contains the reference": a model may say more than the word."""
GENERAL_SCHEMA = {
    "type": "object",
    "properties": {"input": {"type": "array", "items": {"type": "object"}}, "reference": {"type": "string"}},
    "required": ["input", "reference"],
}


def evaluate_job_later(job: FineTuningJob) -> None:
    """Once the job's success is committed, create its automatic evaluations and queue their runs."""
    try:
        if not settings.FT_AUTO_EVAL or job.objective != FineTuningJob.SFT:
            return
        job_pk = job.pk
        transaction.on_commit(lambda: evaluate_job(job_pk), robust=True)
    except Exception:
        log.exception("could not plan the automatic evaluation of job %s", getattr(job, "public_id", job))


def evaluate_job(job_pk: int) -> list[Eval]:
    """Create the held-out and forgetting evaluations of a succeeded job and queue their runs; never raises."""
    made: list[Eval] = []
    try:
        with transaction.atomic():
            # The job's row is locked while its evaluations are made: a success told twice at once
            # makes them once (the second call waits, then finds them).
            job = FineTuningJob.objects.select_for_update().select_related("owner", "validation_file").get(pk=job_pk)
            if job.evaluations.filter(kind__in=(Eval.AUTO, Eval.FORGETTING)).exists():
                return made
            for create in (heldout_eval, forgetting_eval):
                try:
                    with transaction.atomic():  # one that fails leaves the other
                        evaluation = create(job)
                except Exception:
                    log.exception("automatic evaluation of job %s: %s failed", job.public_id, create.__name__)
                    continue
                if evaluation is not None:
                    made.append(evaluation)
    except Exception:
        log.exception("automatic evaluation: job %s could not be read", job_pk)
    return made


def heldout_eval(job: FineTuningJob) -> Eval | None:
    """Base, tuned and every checkpoint on the first FT_AUTO_EVAL_MAX_EXAMPLES held-out examples."""
    dataset = job.validation_file  # a hold-out split fills it too (jobs_app.services.job_prepare_holdout)
    if dataset is None:
        return None
    limit = settings.FT_AUTO_EVAL_MAX_EXAMPLES
    source = {"type": "file_id", "id": dataset.public_id}
    try:
        examples = run_items.read_items(job.owner, {"source": source}, limit=limit)
    except ApplicationError as exc:
        log.warning("job %s: no held-out evaluation: %s", job.public_id, exc.message)
        return None
    tuned = _tuned_model(job)
    evaluation = services.eval_create(
        owner=job.owner,
        name=f"{tuned} held-out",
        data_source_config={"type": "chat"},
        testing_criteria=default_criteria(examples),
        kind=Eval.AUTO,
        job=job,
        metadata={"job": job.public_id},
    )
    runs = [(BASE, _start_model(job), None), (TUNED, tuned, None)]
    runs += [(CHECKPOINT, c.model_id, c.step) for c in job.checkpoints.order_by("step") if c.model_id]
    sampling = {"max_completion_tokens": run_items.answer_budget(examples)}
    for role, model, step in runs:
        _queue_run(evaluation, role, model, source, step=step, limit=limit, sampling=sampling, examples=examples)
    return evaluation


def forgetting_eval(job: FineTuningJob) -> Eval:
    """Base and tuned on the general set: did the fine-tune cost general skills?"""
    tuned = _tuned_model(job)
    evaluation = services.eval_create(
        owner=job.owner,
        name=f"{tuned} general set",
        data_source_config={"type": "custom", "item_schema": GENERAL_SCHEMA, "include_sample_schema": True},
        testing_criteria=GENERAL_CRITERIA,
        kind=Eval.FORGETTING,
        job=job,
        metadata={"job": job.public_id, "set": GENERAL_SET.name},
    )
    content = general_set()
    source = {"type": "file_content", "content": content}
    sampling = {"max_completion_tokens": run_items.answer_budget([line["item"] for line in content])}
    for role, model in ((BASE, _start_model(job)), (TUNED, tuned)):
        _queue_run(evaluation, role, model, source, sampling=sampling)
    return evaluation


@cache
def general_set() -> list[dict]:
    """The general set's lines, `{"item": {...}}` each."""
    with GENERAL_SET.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _start_model(job: FineTuningJob) -> str:
    """What the tuned model is measured against: the fine-tuned model the job went on from, else its base."""
    return job.init_model or job.base_model


def _tuned_model(job: FineTuningJob) -> str:
    return job.fine_tuned_model or job.fine_tuned_model_id


def _queue_run(
    evaluation: Eval, role: str, model: str, source: dict, *, step=None, limit=None, sampling=None, examples=None
) -> None:
    """Queue one model's run; a model that cannot answer (its files gone) is logged and left out."""
    names = {BASE: f"base {model}", TUNED: f"fine-tuned {model}", CHECKPOINT: f"checkpoint step {step}"}
    metadata = {"role": role, **({"step": str(step)} if step is not None else {})}
    try:
        services.run_create(
            evaluation=evaluation,
            data_source={"type": "completions", "model": model, "source": source, "sampling_params": sampling or {}},
            name=names[role][:200],
            metadata=metadata,
            limit=limit,
            examples=examples,
        )
    except ApplicationError as exc:
        log.warning("evaluation %s: no run for %s: %s", evaluation.public_id, model, exc.message)
    except Exception:
        # Most likely the broker refused the message: a run saved queued is sent again by reconcile_runs.
        log.exception("evaluation %s: the run of %s could not be queued", evaluation.public_id, model)
