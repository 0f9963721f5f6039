"""Summaries of per-example scores: a bootstrap interval for a mean, and accuracy by label."""

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm.evals.text import tokens

OTHER_LABEL = "(other)"
# Bounds the resampling matrix held at once, so that a large run's interval does not need gigabytes.
_BOOTSTRAP_CELLS = 1_000_000


def mean_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Return {"mean", "low", "high", "n"}: the mean with a seeded percentile-bootstrap interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    data = np.asarray(values, dtype=float)
    n = len(data)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(data.mean())
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}

    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CELLS // n)
    means = []
    for start in range(0, resamples, rows_per_chunk):
        rows = min(rows_per_chunk, resamples - start)
        means.append(data[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return {"mean": mean, "low": float(low), "high": float(high), "n": n}


def label_summary(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Return accuracy overall and per reference label, and a confusion table (rows reference, columns predicted).

    Labels are compared after stripping surrounding whitespace. A prediction that is no
    reference label is counted in an "(other)" column, listed last.
    """
    stripped = [(reference.strip(), predicted.strip()) for reference, predicted in pairs]
    labels = sorted({reference for reference, _ in stripped})
    known = set(labels)
    if any(predicted not in known for _, predicted in stripped):
        labels.append(OTHER_LABEL)
    position = {label: index for index, label in enumerate(labels)}

    confusion = [[0] * len(labels) for _ in labels]
    for reference, predicted in stripped:
        confusion[position[reference]][position[predicted if predicted in known else OTHER_LABEL]] += 1
    totals = Counter(reference for reference, _ in stripped)
    per_label = {}
    for label in sorted(known):
        correct = confusion[position[label]][position[label]]
        per_label[label] = {"n": totals[label], "correct": correct, "accuracy": correct / totals[label]}

    correct_total = sum(entry["correct"] for entry in per_label.values())
    return {
        "accuracy": correct_total / len(stripped) if stripped else None,
        "n": len(stripped),
        "labels": labels,
        "per_label": per_label,
        "confusion": confusion,
    }


def is_label_task(references: Sequence[str]) -> bool:
    """Tell whether the references look like class labels: few distinct, short, one-line values."""
    if len(references) < 4:
        return False
    for reference in references:
        text = reference.strip()
        if "\n" in text or not 1 <= len(tokens(text)) <= 4:
            return False
    distinct = len({reference.strip() for reference in references})
    return distinct <= len(references) / 2 and distinct <= 200
