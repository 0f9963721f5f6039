"""What a job's automatic evaluations say, for its page and its model card: tuned against base on the
held-out data, the best of the tuned model and its checkpoints, and the forgetting check.

Scores are each run's first grader's mean (`EvalRun.aggregates`), as `evals_app.services` wrote it.
"""

from django.conf import settings
from django.urls import reverse

from .models import Eval, EvalRun

BASE, TUNED, CHECKPOINT = "base", "tuned", "checkpoint"
"""A run's part in an automatic evaluation, kept in its metadata["role"] (checkpoints also keep "step")."""

GRADER_WORDS = {"exact_match": "exact match", "rouge_l": "ROUGE-L", "tool_call": "tool-call match"}


def evaluation_of(job) -> dict | None:
    """Everything the "Evaluation" block shows for a job, or None when it has no automatic evaluation."""
    if job is None:
        return None
    heldout, forgetting = heldout_summary(job), forgetting_summary(job)
    if heldout is None and forgetting is None:
        return None
    running = any(s is not None and s["status"] == "running" for s in (heldout, forgetting))
    return {"heldout": heldout, "best": best_checkpoint(job), "forgetting": forgetting, "running": running}


def heldout_summary(job) -> dict | None:
    """Base and tuned on the held-out data, with the sentence "exact match 0.12 → 0.71 on 154 held-out examples"."""
    summary = _compare(job, Eval.AUTO)
    if summary is None:
        return None
    if summary["base"] is not None and summary["tuned"] is not None:
        summary["sentence"] = (
            f"{summary['grader']} {summary['base']:.2f} → {summary['tuned']:.2f} on {summary['n']} held-out examples"
        )
    return summary


def forgetting_summary(job) -> dict | None:
    """Base and tuned on the general set; `warning` when the score fell by more than FT_FORGETTING_DROP."""
    summary = _compare(job, Eval.FORGETTING)
    if summary is None:
        return None
    base, tuned = summary["base"], summary["tuned"]
    summary["warning"] = False
    if base is not None and tuned is not None:
        summary["change"] = tuned - base
        summary["sentence"] = f"general questions {base:.2f} → {tuned:.2f} on {summary['n']} questions"
        summary["warning"] = base - tuned > settings.FT_FORGETTING_DROP
    if summary["warning"]:
        summary["warning_message"] = (
            f"Forgetting: on general questions the fine-tuned model scores {tuned:.2f} against its base's "
            f"{base:.2f}, a drop of more than {settings.FT_FORGETTING_DROP:.2f}. Fewer epochs, a lower learning "
            "rate or an earlier checkpoint may keep more of what the base model knew."
        )
    return summary


def best_checkpoint(job) -> dict | None:
    """The tuned model or checkpoint with the best held-out score (ties: the later step).

    None until every one of them has finished, so that the pick never changes under the user.
    """
    evaluation = _latest(job, Eval.AUTO)
    if evaluation is None:
        return None
    grader = _first_grader(evaluation)
    runs = [run for run in evaluation.runs.all() if _role(run) in (TUNED, CHECKPOINT)]
    if not runs or any(run.is_active for run in runs):
        return None
    final_step = job.total_steps or job.step
    scored = []
    for run in runs:
        score = _score(run, grader)
        if run.status != EvalRun.COMPLETED or score is None:
            continue
        is_final = _role(run) == TUNED
        step = final_step if is_final else _step(run)
        scored.append((score, step, is_final, run))
    if not scored:
        return None
    score, step, is_final, run = max(scored, key=lambda row: row[:3])
    return {
        "model_id": run.model,
        "score": score,
        "step": step,
        "is_final": is_final,
        "grader": _grader_words(grader),
        "url": reverse("eval_detail", args=[evaluation.public_id]),
    }


def _compare(job, kind: str) -> dict | None:
    """Base and tuned scores of the job's latest evaluation of this kind, with the progress of all its runs."""
    evaluation = _latest(job, kind)
    if evaluation is None:
        return None
    grader = _first_grader(evaluation)
    runs = list(evaluation.runs.all())
    base, tuned = _with_role(runs, BASE), _with_role(runs, TUNED)
    counted = tuned or base
    return {
        "grader": _grader_words(grader),
        "base": _score(base, grader),
        "tuned": _score(tuned, grader),
        "base_interval": _interval(base, grader),
        "tuned_interval": _interval(tuned, grader),
        "n": counted.total if counted else 0,
        "status": "running" if any(run.is_active for run in runs) else "done",
        "done": sum(run.done for run in runs),
        "total": sum(run.total for run in runs),
        "failed": [run.name for run in runs if run.status in (EvalRun.FAILED, EvalRun.CANCELED)],
        "sentence": None,
        "url": reverse("eval_detail", args=[evaluation.public_id]),
    }


def _latest(job, kind: str) -> Eval | None:
    return Eval.objects.filter(job=job, kind=kind).order_by("-id").first()


def _first_grader(evaluation: Eval) -> str:
    criteria = evaluation.testing_criteria or [{}]
    return criteria[0].get("name") or "grader_0"


def _grader_words(name: str) -> str:
    return GRADER_WORDS.get(name, name.replace("_", " "))


def _role(run: EvalRun) -> str:
    return (run.metadata or {}).get("role", "")


def _step(run: EvalRun) -> int:
    try:
        return int((run.metadata or {}).get("step", 0))
    except (TypeError, ValueError):
        return 0


def _with_role(runs: list[EvalRun], role: str) -> EvalRun | None:
    # Runs come newest first: a run added later for the same role (a re-run) wins.
    return next((run for run in runs if _role(run) == role), None)


def _aggregate(run: EvalRun | None, grader: str) -> dict:
    if run is None or run.status != EvalRun.COMPLETED:
        return {}
    return (run.aggregates or {}).get(grader) or {}


def _score(run: EvalRun | None, grader: str) -> float | None:
    return _aggregate(run, grader).get("mean")


def _interval(run: EvalRun | None, grader: str) -> tuple[float, float] | None:
    aggregate = _aggregate(run, grader)
    if aggregate.get("low") is None or aggregate.get("high") is None:
        return None
    return (aggregate["low"], aggregate["high"])
