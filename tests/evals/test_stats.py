"""Bootstrap intervals and label summaries on hand-made data."""

import pytest

from llm.evals.stats import is_label_task, label_summary, mean_interval

SCORES = [0, 1, 1, 1, 0, 1, 1, 0, 1, 1]


def test_mean_interval_holds_the_exact_mean_and_is_seeded():
    summary = mean_interval(SCORES)
    assert summary["mean"] == 0.7 and summary["n"] == 10
    assert 0 <= summary["low"] < 0.7 < summary["high"] <= 1
    assert mean_interval(SCORES) == summary
    assert mean_interval(SCORES, seed=1)["mean"] == 0.7
    # A narrower confidence gives a narrower interval from the same resamples.
    narrow = mean_interval(SCORES, confidence=0.5)
    assert summary["low"] <= narrow["low"] <= narrow["high"] <= summary["high"]


def test_mean_interval_of_many_values_is_tight():
    values = [i % 4 / 3 for i in range(4000)]  # 0, 1/3, 2/3, 1 repeating: mean 0.5
    summary = mean_interval(values, resamples=500)
    assert summary["mean"] == pytest.approx(0.5)
    assert 0.48 < summary["low"] < 0.5 < summary["high"] < 0.52


def test_mean_interval_of_no_value_one_value_and_equal_values():
    assert mean_interval([]) == {"mean": None, "low": None, "high": None, "n": 0}
    assert mean_interval([0.25]) == {"mean": 0.25, "low": 0.25, "high": 0.25, "n": 1}
    assert mean_interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 3}
    with pytest.raises(ValueError, match="confidence"):
        mean_interval(SCORES, confidence=95)


def test_label_summary_counts_a_confusion_table_by_hand():
    pairs = [
        ("card_arrival", "card_arrival"),
        ("card_arrival", "refund"),
        ("refund", "refund"),
        ("refund", " refund\n"),
        ("top_up", "card_arrival"),
        ("top_up", "I am not sure"),
    ]
    summary = label_summary(pairs)
    assert summary["n"] == 6 and summary["accuracy"] == pytest.approx(3 / 6)
    assert summary["labels"] == ["card_arrival", "refund", "top_up", "(other)"]
    assert summary["confusion"] == [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 0, 0, 1],
        [0, 0, 0, 0],
    ]
    assert summary["per_label"] == {
        "card_arrival": {"n": 2, "correct": 1, "accuracy": 0.5},
        "refund": {"n": 2, "correct": 2, "accuracy": 1.0},
        "top_up": {"n": 2, "correct": 0, "accuracy": 0.0},
    }


def test_label_summary_without_other_predictions_or_pairs():
    assert label_summary([("a", "a"), ("b", "a")])["labels"] == ["a", "b"]
    assert label_summary([]) == {"accuracy": None, "n": 0, "labels": [], "per_label": {}, "confusion": []}


def test_is_label_task():
    assert is_label_task(["card_arrival", "refund", "card_arrival", "refund", "top_up", "refund"])
    assert is_label_task(["正面", "负面", "正面", "负面"])
    assert not is_label_task(["yes", "no", "yes"])  # too few
    assert not is_label_task(["a", "b", "c", "d"])  # every value distinct
    assert not is_label_task(["a long answer of many words", "b", "b", "b"])
    assert not is_label_task(["a\nb", "b", "b", "b"])
    assert not is_label_task(["", "b", "b", "b"])
