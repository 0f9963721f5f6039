"""Batch compare as a small evaluation run: every chosen model answers the same validation examples.

The playground makes an eval of kind `compare` over the sampled examples, graded by exact match
and ROUGE-L (llm.evals scores them, CJK-aware), and one run per model. The evaluations worker
answers the runs through the serving engine, batched; nothing is generated or scored in the web
request. `batch_progress` reads what the page shows while the runs go on and once they end.
"""

from dataclasses import dataclass, field

from django.db import transaction

from evals_app import services as eval_services
from evals_app.models import Eval, EvalOutputItem, EvalRun
from evals_app.pages import last_user_text, progress_percent
from evals_app.selectors import eval_for
from llm.evals.graders import EXACT_MATCH, ROUGE_L

MAX_BATCH = 50
MAX_MODELS = 3
"""As many as the playground has panes."""


@transaction.atomic
def batch_compare_create(*, user, models: list[str], examples: list[dict], sampling: dict, system: str = "") -> Eval:
    """Make the eval over the examples and queue one run per model; the worker gets them after commit.

    examples are {"messages", "reference"}; sampling holds OpenAI's sampling_params. A system
    prompt, when given, replaces the examples' own.
    """
    content = [{"item": {"input": with_system(e["messages"], system), "reference": e["reference"]}} for e in examples]
    evaluation = eval_services.eval_create(
        owner=user,
        name=f"Playground batch compare: {len(examples)} prompts",
        data_source_config={"type": "chat"},
        testing_criteria=[EXACT_MATCH, ROUGE_L],
        kind=Eval.COMPARE,
    )
    for model in models:
        eval_services.run_create(
            evaluation=evaluation,
            name=model,
            data_source={
                "type": "completions",
                "model": model,
                "source": {"type": "file_content", "content": content},
                "sampling_params": sampling,
            },
        )
    return evaluation


def with_system(messages: list[dict], system: str) -> list[dict]:
    if not system:
        return messages
    return [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]


# --- Reading progress -----------------------------------------------------------


@dataclass
class Column:
    """One model's run: its progress and, per grader, the mean so far (final once the run ends)."""

    run: EvalRun
    exact_match: dict
    rouge_l: dict
    errored: int

    @property
    def percent(self) -> int:
        return progress_percent(self.run)

    @property
    def totals(self) -> str:
        """Like "exact match 40.0% [10.0, 70.0] · ROUGE-L 0.312 [0.201, 0.415] over 10 prompts"."""
        exact, rouge = self.exact_match, self.rouge_l
        if not exact.get("n") and not rouge.get("n"):
            return "no answers yet"
        parts = []
        if exact.get("n"):
            parts.append(
                f"exact match {100 * exact['mean']:.1f}% [{100 * exact['low']:.1f}, {100 * exact['high']:.1f}]"
            )
        if rouge.get("n"):
            parts.append(f"ROUGE-L {rouge['mean']:.3f} [{rouge['low']:.3f}, {rouge['high']:.3f}]")
        scored = max(exact.get("n") or 0, rouge.get("n") or 0)
        return " · ".join(parts) + f" over {scored} prompts" + (f" · {self.errored} errors" if self.errored else "")


@dataclass
class Row:
    index: int
    prompt: str
    reference: str
    answers: list[dict | None] = field(default_factory=list)
    """Per column: {"text", "error", "exact_match", "rouge_l"}, or None while not answered yet."""


@dataclass
class BatchProgress:
    evaluation: Eval
    columns: list[Column]
    rows: list[Row]

    @property
    def active(self) -> bool:
        return any(column.run.is_active for column in self.columns)


def batch_progress(user, eval_id: str) -> BatchProgress | None:
    """The user's batch compare: each model's progress and totals, and every example's answers so far."""
    evaluation = eval_for(user, eval_id)
    if evaluation is None or evaluation.kind != Eval.COMPARE:
        return None
    runs = list(evaluation.runs.order_by("id"))
    columns = [_column(run) for run in runs]
    content = runs[0].data_source["source"]["content"] if runs else []
    rows = [Row(i, last_user_text(e["item"]["input"]), e["item"]["reference"]) for i, e in enumerate(content)]
    answered = _answers(runs)
    for row in rows:
        row.answers = [answered.get((run.pk, row.index)) for run in runs]
    return BatchProgress(evaluation, columns, rows)


def _column(run: EvalRun) -> Column:
    # The worker stores a run's totals every few seconds while it runs, and when it ends: read, never recomputed.
    aggregates = run.aggregates or {}
    return Column(
        run=run,
        exact_match=aggregates.get(EXACT_MATCH["name"]) or {},
        rouge_l=aggregates.get(ROUGE_L["name"]) or {},
        errored=(run.result_counts or {}).get("errored", 0),
    )


def _answers(runs: list[EvalRun]) -> dict[tuple[int, int], dict]:
    answers = {}
    items = EvalOutputItem.objects.filter(run__in=runs).values_list(
        "run_id", "index", "output_text", "error", "results"
    )
    for run_id, index, text, error, results in items:
        scores = {result["name"]: result for result in results}
        answers[(run_id, index)] = {
            "text": text,
            "error": error or next((r["error"] for r in results if r.get("error")), ""),
            "exact_match": bool((scores.get(EXACT_MATCH["name"]) or {}).get("passed")),
            "rouge_l": (scores.get(ROUGE_L["name"]) or {}).get("score"),
        }
    return answers
