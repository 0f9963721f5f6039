"""Reads for the evaluation pages: runs side by side, per-example rows and their filters, the diff of two
answers, and the exports. Everything comes from stored rows: nothing here answers or scores."""

import csv
import difflib
import json
import re
from collections import defaultdict
from collections.abc import Iterator

from django.core.paginator import Page, Paginator
from django.db.models import Count, Prefetch, Q
from django.http import QueryDict
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from llm.evals.stats import OTHER_LABEL
from llm.evals.text import CJK

from . import items as run_items
from .models import Eval, EvalOutputItem, EvalRun

ROWS_PER_PAGE = 50
MAX_CONFUSION_LABELS = 30
MAX_DIFF_TOKENS = 2000
"""Diffing costs up to the product of the two lengths: a page of very long answers diffs their beginnings."""
FILTERS = {
    "all": "All examples",
    "a_right_b_wrong": "A right, B wrong",
    "a_wrong_b_right": "A wrong, B right",
    "errors": "Errors",
    "all_wrong": "All wrong",
}
"""The per-example filters. "Right" is an example that passed every grader; "wrong" is one answered that did
not (failed or errored). The pair filters compare runs A and B only; examples B has not answered are left out."""

PAIR_FILTERS = ("a_right_b_wrong", "a_wrong_b_right")
EXPORT_FIELDS = ("index", "model", "run_id", "input", "reference", "answer", "tool_calls", "status", "error")

# Chinese and Japanese have no spaces between words: their answers are diffed character by character.
_DIFF_TOKEN = re.compile(f"[{CJK}]|[^\\W{CJK}]+|\\s+|[^\\w\\s]")


# --- The list ------------------------------------------------------------------------------


def eval_summaries(user, limit: int = 200) -> list[dict]:
    """The user's evals, newest first, each with its runs in the order they were started."""
    evals = Eval.objects.owned_by(user).prefetch_related(Prefetch("runs", queryset=EvalRun.objects.order_by("id")))
    summaries = []
    for evaluation in evals[:limit]:
        names = grader_names(evaluation)
        headline = names[0] if names else ""
        runs = [
            {"run": run, "score": ((run.aggregates or {}).get(headline) or {}).get("mean")}
            for run in evaluation.runs.all()
        ]
        summaries.append({"eval": evaluation, "headline": headline, "runs": runs})
    return summaries


def grader_names(evaluation: Eval) -> list[str]:
    """Each testing criterion's name, as the run's aggregates are keyed."""
    return [spec.get("name") or f"grader_{i}" for i, spec in enumerate(evaluation.testing_criteria)]


def progress_percent(run: EvalRun) -> int:
    return min(100, round(100 * run.done / run.total)) if run.total else 0


def dataset_items(user, dataset_id: str, *, limit: int) -> list[dict]:
    """The first `limit` gradable items of one of the user's processed files."""
    return run_items.read_items(user, {"source": {"type": "file_id", "id": dataset_id}}, limit=limit)


# --- Runs side by side ---------------------------------------------------------------------


def runs_of(evaluation: Eval) -> list[EvalRun]:
    """The runs in the order they were started: the first model picked is the first column."""
    return list(evaluation.runs.order_by("id"))


def run_totals(evaluation: Eval, runs: list[EvalRun]) -> dict:
    """The comparison's head: per run its progress and result counts (counted live while it runs), per
    grader a row of each run's stored totals, and the label tables of label tasks."""
    live = _live_counts([run for run in runs if run.is_active])
    columns = [
        {
            "run": run,
            "percent": progress_percent(run),
            "counts": live.get(run.pk) if run.is_active else (run.result_counts or None),
        }
        for run in runs
    ]
    graders = [
        {"name": name, "cells": [grader_total(name, (run.aggregates or {}).get(name)) for run in runs]}
        for name in grader_names(evaluation)
    ]
    labels = [
        {"run": run, "grader": row["name"], **cell["labels"]}
        for row in graders
        for run, cell in zip(runs, row["cells"], strict=True)
        if cell.get("labels")
    ]
    return {"columns": columns, "graders": graders, "label_tables": labels, "active": any(r.is_active for r in runs)}


def _live_counts(runs: list[EvalRun]) -> dict[int, dict]:
    counts: dict[int, dict] = {run.pk: {"passed": 0, "failed": 0, "errored": 0} for run in runs}
    key = {EvalOutputItem.PASS: "passed", EvalOutputItem.FAIL: "failed", EvalOutputItem.ERROR: "errored"}
    rows = EvalOutputItem.objects.filter(run__in=runs).values_list("run_id", "status").annotate(n=Count("id"))
    for run_id, status, n in rows:
        counts[run_id][key.get(status, "errored")] += n
    return counts


def grader_total(name: str, aggregate: dict | None) -> dict:
    """One grader's totals for one run; `pending` until the run has been summarised."""
    if not aggregate:
        return {"name": name, "pending": True}
    labels = aggregate.get("labels")
    return {
        "name": name,
        "pending": False,
        "mean": aggregate.get("mean"),
        "low": aggregate.get("low"),
        "high": aggregate.get("high"),
        "n": aggregate.get("n"),
        "pass_rate": aggregate.get("pass_rate"),
        "errors": aggregate.get("errors") or 0,
        "labels": label_table(labels) if labels else None,
    }


def label_table(summary: dict) -> dict:
    """Accuracy per reference label and the confusion table (reference rows, predicted columns).

    Only labels that occur are shown; past MAX_CONFUSION_LABELS, the most frequent reference labels
    are kept and predictions of the others are summed in a last column.
    """
    labels, confusion, per_label = summary["labels"], summary["confusion"], summary["per_label"]
    present = [i for i, row in enumerate(confusion) if sum(row) and labels[i] != OTHER_LABEL]
    kept = sorted(sorted(present, key=lambda i: -sum(confusion[i]))[:MAX_CONFUSION_LABELS])
    columns = [
        j for j in range(len(labels)) if (j in kept or labels[j] == OTHER_LABEL) and any(confusion[i][j] for i in kept)
    ]
    rest = [sum(confusion[i]) - sum(confusion[i][j] for j in columns) for i in kept]
    show_rest = any(rest)
    rows = []
    for i, remainder in zip(kept, rest, strict=True):
        stats = per_label.get(labels[i], {})
        cells = [{"count": confusion[i][j], "correct": i == j} for j in columns]
        if show_rest:
            cells.append({"count": remainder, "correct": False})
        rows.append({"label": labels[i], "n": stats.get("n", 0), "accuracy": stats.get("accuracy"), "cells": cells})
    return {
        "accuracy": summary.get("accuracy"),
        "n": summary.get("n"),
        "columns": [labels[j] for j in columns] + (["other labels"] if show_rest else []),
        "rows": rows,
        "hidden": len(present) - len(kept),
        "shown": len(kept),
        "total": len(present),
    }


# --- Per-example rows ----------------------------------------------------------------------


def pick_pair(runs: list[EvalRun], params) -> tuple[EvalRun, EvalRun] | None:
    """Runs A and B for the pair filters and the diff: `a=` and `b=` run ids, else the first two runs."""
    if len(runs) < 2:
        return None
    by_id = {run.public_id: run for run in runs}
    a = by_id.get(params.get("a") or params.get("run") or "") or runs[0]
    b = by_id.get(params.get("b") or "") or next(run for run in runs if run != a)
    return a, b


def matching_indexes(runs: list[EvalRun], show: str, pair: tuple[EvalRun, EvalRun] | None):
    """The example indexes a filter keeps, in order, as a query."""
    items = EvalOutputItem.objects.filter(run__in=runs)
    if show in PAIR_FILTERS and pair is not None:
        right, wrong = pair if show == "a_right_b_wrong" else pair[::-1]
        wrong_there = wrong.items.exclude(status=EvalOutputItem.PASS).values("index")
        items = right.items.filter(status=EvalOutputItem.PASS, index__in=wrong_there)
    elif show == "errors":
        items = items.filter(status=EvalOutputItem.ERROR)
    elif show == "all_wrong":
        return (
            items.values("index")
            .annotate(answered=Count("id"), passed=Count("id", filter=Q(status=EvalOutputItem.PASS)))
            .filter(answered=len(runs), passed=0)
            .order_by("index")
            .values_list("index", flat=True)
        )
    return items.order_by("index").values_list("index", flat=True).distinct()


def example_page(runs: list[EvalRun], params: QueryDict) -> dict:
    """The filter, the pair, one page of rows, and the query string that keeps them across pages."""
    show = params.get("show") if params.get("show") in FILTERS else "all"
    pair = pick_pair(runs, params)
    if pair is None and show in PAIR_FILTERS:
        show = "all"
    page = Paginator(matching_indexes(runs, show, pair), ROWS_PER_PAGE).get_page(params.get("page"))
    others = params.copy()
    others.pop("page", None)
    return {
        "show": show,
        "show_label": FILTERS[show],
        "pair": pair,
        "page": page,
        "page_query": others.urlencode(),
        "rows": example_rows(runs, page, pair),
    }


def example_rows(runs: list[EvalRun], indexes: Page | list[int], pair: tuple[EvalRun, EvalRun] | None) -> list[dict]:
    """One row per example: its input and reference, each run's answer and scores lined up by index."""
    wanted = list(indexes)
    found: dict[int, dict[int, EvalOutputItem]] = defaultdict(dict)
    for item in EvalOutputItem.objects.filter(run__in=runs, index__in=wanted):
        found[item.index][item.run_id] = item
    rows = []
    for index in wanted:
        by_run = found.get(index, {})
        first = next(iter(by_run.values()), None)
        a, b = (by_run.get(pair[0].pk), by_run.get(pair[1].pk)) if pair else (None, None)
        rows.append(
            {
                "index": index,
                "input": last_user_message(first),
                "reference": reference_of(first),
                "cells": [_cell(by_run.get(run.pk)) for run in runs],
                "diff": word_diff(answer_of(a), answer_of(b)) if a and b else None,
            }
        )
    return rows


def _cell(item: EvalOutputItem | None) -> dict | None:
    if item is None:
        return None
    scores = [
        {"name": r.get("name"), "score": r.get("score"), "passed": r.get("passed"), "error": r.get("error")}
        for r in item.results
    ]
    return {"answer": answer_of(item), "status": item.status, "error": item.error, "scores": scores}


def last_user_message(item: EvalOutputItem | None) -> str:
    """The last user turn the model was sent, as text."""
    if item is None:
        return ""
    return last_user_text(item.input or item.item.get("input") or [])


def last_user_text(messages: list) -> str:
    """The last user turn of a conversation, as text."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and "text" in part)
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def reference_of(item: EvalOutputItem | None) -> str:
    """The item's reference answer, else the reference the first grader compared with."""
    if item is None:
        return ""
    reference = item.item.get("reference")
    if isinstance(reference, str):
        return reference
    details = [r.get("detail") for r in item.results if isinstance(r.get("detail"), dict)]
    return str(details[0].get("reference", "")) if details else ""


def answer_of(item: EvalOutputItem | None) -> str:
    """The answer's text, with its tool calls written after it as name(arguments)."""
    if item is None:
        return ""
    calls = [_call_text(call) for call in item.output_tools or []]
    return "\n".join(part for part in [item.output_text, *calls] if part)


def _call_text(call) -> str:
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"{function.get('name', '?')}({arguments})"


def word_diff(a: str, b: str) -> SafeString:
    """Mark up what changed from a to b, word by word (CJK character by character), HTML-escaped."""
    old, new = _DIFF_TOKEN.findall(a), _DIFF_TOKEN.findall(b)
    cut = len(old) > MAX_DIFF_TOKENS or len(new) > MAX_DIFF_TOKENS
    old, new = old[:MAX_DIFF_TOKENS], new[:MAX_DIFF_TOKENS]
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        removed, added = escape("".join(old[i1:i2])), escape("".join(new[j1:j2]))
        if op == "equal":
            parts.append(removed)
            continue
        if removed:
            parts.append(f"<del>{removed}</del>")
        if added:
            parts.append(f"<ins>{added}</ins>")
    if cut:
        parts.append(f' <span class="muted">(the diff stops after {MAX_DIFF_TOKENS} words)</span>')
    return mark_safe("".join(parts))  # every piece of text above is escaped


# --- Exports -------------------------------------------------------------------------------


def export_records(evaluation: Eval) -> Iterator[dict]:
    """One record per (example, run), by example then run, read from the stored rows."""
    runs = {run.pk: run for run in runs_of(evaluation)}
    names = grader_names(evaluation)
    stored = EvalOutputItem.objects.filter(run__eval=evaluation).order_by("index", "run_id")
    for item in stored.iterator(chunk_size=500):
        run = runs[item.run_id]
        scores = {name: None for name in names}
        for name, result in zip(names, item.results, strict=False):
            scores[name] = result.get("score")
        yield {
            "index": item.index,
            "model": run.model,
            "run_id": run.public_id,
            "input": last_user_message(item),
            "reference": reference_of(item),
            "answer": item.output_text,
            "tool_calls": item.output_tools,
            "status": item.status,
            "error": item.error,
            "scores": scores,
        }


class _Line:
    """A file-like object csv.writer writes one row to, handed straight back."""

    def write(self, value: str) -> str:
        return value


def csv_lines(evaluation: Eval) -> Iterator[str]:
    """The export as CSV: the fields above, then one `score:<grader>` column per grader."""
    writer = csv.writer(_Line())
    names = grader_names(evaluation)
    yield writer.writerow([*EXPORT_FIELDS, *(f"score:{name}" for name in names)])
    for record in export_records(evaluation):
        tool_calls = json.dumps(record["tool_calls"], ensure_ascii=False) if record["tool_calls"] else ""
        fields = [record[field] for field in EXPORT_FIELDS[:6]] + [tool_calls, record["status"], record["error"]]
        yield writer.writerow([*fields, *(_blank_if_none(record["scores"][name]) for name in names)])


def _blank_if_none(value):
    return "" if value is None else value


def jsonl_lines(evaluation: Eval) -> Iterator[str]:
    """The export as JSON lines, scores as {grader: score}."""
    for record in export_records(evaluation):
        yield json.dumps(record, ensure_ascii=False) + "\n"
