"""Reads for evaluations: the caller's own evals, runs and output items only."""

from .models import Eval, EvalRun


def evals_for(user):
    return Eval.objects.owned_by(user)


def eval_for(user, public_id: str) -> Eval | None:
    return Eval.objects.owned_by(user).filter(public_id=public_id).first()


def run_for(evaluation: Eval, public_id: str) -> EvalRun | None:
    return evaluation.runs.filter(public_id=public_id).select_related("eval").first()
