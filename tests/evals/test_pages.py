"""The evaluation pages: creating an eval from the form, the comparison page (totals, rows, filters, diff,
live progress, cancel and resume) and the exports, each visible to its owner only."""

import csv
import io
import json

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.urls import reverse

from evals_app import forms, pages, services
from evals_app.models import Eval, EvalOutputItem, EvalRun
from llm.evals.stats import label_summary

from .conftest import BASE, run_now

PASS, FAIL, ERROR = EvalOutputItem.PASS, EvalOutputItem.FAIL, EvalOutputItem.ERROR
EXACT = {
    "type": "string_check",
    "name": "exact_match",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
    "operation": "eq",
}


@pytest.fixture(autouse=True)
def enqueued(monkeypatch):
    """Runs execute here with run_now; what would be sent to the worker is recorded."""
    sent = []
    monkeypatch.setattr(services, "_enqueue", sent.append)
    return sent


@pytest.fixture
def bob(db):
    return get_user_model().objects.create_user("bob", password="pw-bob-123")


def stored_eval(owner, statuses: dict[str, list[str]], *, run_status=EvalRun.COMPLETED) -> Eval:
    """An eval whose runs (one per model) already hold an answer per example with the given statuses."""
    evaluation = Eval.objects.create(owner=owner, name="stored", data_source_config={}, testing_criteria=[EXACT])
    for model, row_statuses in statuses.items():
        run = EvalRun.objects.create(
            eval=evaluation,
            owner=owner,
            model=model,
            status=run_status,
            total=len(row_statuses),
            done=len(row_statuses),
        )
        EvalOutputItem.objects.bulk_create(
            EvalOutputItem(
                run=run,
                index=index,
                item={"input": [{"role": "user", "content": f"question {index}"}], "reference": f"answer {index}"},
                input=[{"role": "user", "content": f"question {index}"}],
                output_text=f"{model} says {index}",
                status=status,
                results=[
                    {
                        "name": "exact_match",
                        "type": "string_check",
                        "score": None if status == ERROR else float(status == PASS),
                        "passed": None if status == ERROR else status == PASS,
                        "error": "item.reference is missing" if status == ERROR else None,
                    }
                ],
            )
            for index, status in enumerate(row_statuses)
        )
    return evaluation


def shown(client, evaluation, **params) -> list[int]:
    response = client.get(reverse("eval_detail", args=[evaluation.public_id]), params)
    assert response.status_code == 200
    return [row["index"] for row in response.context["rows"]]


def body(response) -> str:
    """A streamed export, read as the ASGI server reads it (its database reads come back to this thread)."""

    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)().decode()


@pytest.mark.django_db(transaction=True)
def test_it_compares_two_models_run_from_the_form(client, alice, heldout, card, enqueued):
    form = {"name": "codes", "models": [BASE, card.model_id], "dataset": heldout.public_id, "graders": "default"}
    response = client.post(reverse("eval_list"), {**form, "max_examples": 200})

    evaluation = Eval.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("eval_detail", args=[evaluation.public_id])
    assert [spec["name"] for spec in evaluation.testing_criteria] == ["exact_match"]  # short answers
    base, tuned = pages.runs_of(evaluation)
    assert [base.model, tuned.model] == [BASE, card.model_id]
    assert base.data_source["source"] == {"type": "file_id", "id": heldout.public_id}
    assert sorted(enqueued) == [base.pk, tuned.pk]
    base, tuned = run_now(base), run_now(tuned)
    assert (base.status, tuned.status) == (EvalRun.COMPLETED, EvalRun.COMPLETED)

    page = client.get(reverse("eval_detail", args=[evaluation.public_id]))
    html = page.content.decode()
    assert base.model in html and tuned.model in html
    (grader,) = page.context["graders"]
    for run, cell in zip((base, tuned), grader["cells"], strict=True):
        stored = run.aggregates["exact_match"]
        assert (cell["mean"], cell["low"], cell["high"], cell["n"]) == (
            stored["mean"],
            stored["low"],
            stored["high"],
            6,
        )
        assert cell["low"] <= cell["mean"] <= cell["high"]
    assert html.count('data-testid="interval"') == 2
    assert 'hx-trigger="every 2s"' not in html  # both runs are final

    # Rows line up by example: each run's answer to the same question sits in one row.
    rows = page.context["rows"]
    assert [row["index"] for row in rows] == list(range(6))
    for row in rows:
        assert row["input"] == f"What is the code for item {row['index']}?"
        assert row["reference"] == f"code {row['index']}"
        answers = [run.items.get(index=row["index"]).output_text for run in (base, tuned)]
        assert [cell["answer"] for cell in row["cells"]] == answers
        assert row["diff"] == pages.word_diff(*answers)

    # The filters, on statuses set by hand:  index 0 1 2 3 4 5
    statuses = {base: [PASS, FAIL, PASS, FAIL, FAIL, ERROR], tuned: [PASS, PASS, FAIL, FAIL, ERROR, FAIL]}
    for run, row_statuses in statuses.items():
        for index, status in enumerate(row_statuses):
            run.items.filter(index=index).update(status=status)
    assert shown(client, evaluation, show="a_right_b_wrong") == [2]
    assert shown(client, evaluation, show="a_wrong_b_right") == [1]
    assert shown(client, evaluation, show="a_right_b_wrong", a=tuned.public_id, b=base.public_id) == [1]
    assert shown(client, evaluation, show="errors") == [4, 5]
    assert shown(client, evaluation, show="all_wrong") == [3, 4, 5]
    assert shown(client, evaluation, show="all") == list(range(6))

    exported = client.get(reverse("eval_export_csv", args=[evaluation.public_id]))
    assert exported.streaming
    records = list(csv.DictReader(io.StringIO(body(exported))))
    assert len(records) == 2 * 6
    assert {(int(r["index"]), r["run_id"]) for r in records} == {
        (i, run.public_id) for i in range(6) for run in (base, tuned)
    }
    first = records[0]
    assert (first["model"], first["reference"], first["status"]) == (BASE, "code 0", PASS)
    assert first["answer"] == base.items.get(index=0).output_text
    assert float(first["score:exact_match"]) == base.items.get(index=0).results[0]["score"]

    lines = body(client.get(reverse("eval_export_jsonl", args=[evaluation.public_id]))).splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 * 6
    assert [(r["index"], r["model"]) for r in records[:2]] == [(0, BASE), (0, card.model_id)]
    assert set(records[0]["scores"]) == {"exact_match"}

    listed = client.get(reverse("eval_list")).content.decode()
    assert evaluation.public_id in listed and "codes" in listed


@pytest.mark.django_db
def test_it_refuses_bad_custom_graders_beside_the_field(client, alice, heldout):
    form = {"models": [BASE], "dataset": heldout.public_id, "graders": "custom", "max_examples": 10}

    not_json = client.post(reverse("eval_list"), {**form, "custom": "[{'type': 'string_check'}]"})
    assert not_json.status_code == 200
    assert "not valid JSON" in not_json.context["form"].errors["custom"][0]

    missing = {**EXACT, "reference": "{{item.answer}}"}
    refused = client.post(reverse("eval_list"), {**form, "custom": json.dumps([missing])})
    assert refused.status_code == 200
    (error,) = refused.context["form"].errors["custom"]
    assert "testing_criteria[0].reference" in error and "item.answer" in error
    assert 'data-testid="form-error"' in refused.content.decode()

    no_preset = client.post(reverse("eval_list"), {**form, "graders": "presets"})
    assert no_preset.context["form"].errors["presets"] == ["Pick at least one preset."]
    assert Eval.objects.count() == 0


@pytest.mark.django_db
def test_it_creates_runs_with_presets_and_refuses_them_all_when_one_model_is_refused(
    client, alice, heldout, monkeypatch
):
    form = {"dataset": heldout.public_id, "graders": "presets", "presets": ["contains", "bleu"], "max_examples": 3}

    response = client.post(reverse("eval_list"), {**form, "models": [BASE]})
    evaluation = Eval.objects.get()
    assert response.status_code == 302
    assert [spec["name"] for spec in evaluation.testing_criteria] == ["contains", "bleu"]
    assert evaluation.testing_criteria[0]["operation"] == "ilike"
    assert evaluation.runs.get().total == 3

    # A model that resolves for nobody, listed among the choices as a stale page might list it.
    listed = forms.model_choices
    monkeypatch.setattr(forms, "model_choices", lambda user: [*listed(user), "no-such-model"])
    refused = client.post(reverse("eval_list"), {**form, "models": [BASE, "no-such-model"]})
    assert refused.status_code == 200
    assert "no-such-model" in refused.context["form"].errors["models"][0]
    assert Eval.objects.count() == 1  # the eval and its first run were rolled back with the refused one


@pytest.mark.django_db
def test_it_shows_evaluations_only_to_their_owner(client, alice, bob):
    evaluation = stored_eval(alice, {"a": [PASS], "b": [FAIL]})
    run = evaluation.runs.first()
    client.force_login(bob)
    for name in ("eval_detail", "eval_progress", "eval_export_csv", "eval_export_jsonl"):
        assert client.get(reverse(name, args=[evaluation.public_id])).status_code == 404, name
    for name in ("eval_run_cancel", "eval_run_resume"):
        assert client.post(reverse(name, args=[evaluation.public_id, run.public_id])).status_code == 404, name
    assert evaluation.public_id not in client.get(reverse("eval_list")).content.decode()
    client.logout()
    assert client.get(reverse("eval_detail", args=[evaluation.public_id])).status_code == 302  # to the login page


@pytest.mark.django_db
def test_it_cancels_a_queued_run_and_resumes_it(client, alice, enqueued, django_capture_on_commit_callbacks):
    evaluation = stored_eval(alice, {"a": [PASS, FAIL]}, run_status=EvalRun.QUEUED)
    run = evaluation.runs.get()
    cancel = reverse("eval_run_cancel", args=[evaluation.public_id, run.public_id])
    assert cancel in client.get(reverse("eval_detail", args=[evaluation.public_id])).content.decode()

    assert client.post(cancel).url == reverse("eval_detail", args=[evaluation.public_id])
    run.refresh_from_db()
    assert run.status == EvalRun.CANCELED

    resume = reverse("eval_run_resume", args=[evaluation.public_id, run.public_id])
    assert resume in client.get(reverse("eval_detail", args=[evaluation.public_id])).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        client.post(resume)
    run.refresh_from_db()
    assert (run.status, enqueued) == (EvalRun.QUEUED, [run.pk])


@pytest.mark.django_db
def test_it_refuses_to_resume_a_completed_run_with_a_message(client, alice):
    evaluation = stored_eval(alice, {"a": [PASS]})
    run = evaluation.runs.get()
    response = client.post(reverse("eval_run_resume", args=[evaluation.public_id, run.public_id]), follow=True)
    assert response.status_code == 200
    assert "only a canceled or failed run can be resumed" in response.content.decode()
    run.refresh_from_db()
    assert run.status == EvalRun.COMPLETED


@pytest.mark.django_db
def test_progress_polls_only_while_a_run_is_active(client, alice):
    evaluation = stored_eval(alice, {"a": [PASS], "b": []}, run_status=EvalRun.IN_PROGRESS)
    progress = reverse("eval_progress", args=[evaluation.public_id])
    page = client.get(reverse("eval_detail", args=[evaluation.public_id])).content.decode()
    assert f'hx-get="{progress}" hx-trigger="every 2s"' in page

    polled = client.get(progress, HTTP_HX_REQUEST="true")
    assert 'hx-trigger="every 2s"' in polled.content.decode()
    assert "HX-Refresh" not in polled
    assert "1 passed · 0 failed · 0 errors" in polled.content.decode()  # counted live

    evaluation.runs.update(status=EvalRun.COMPLETED)
    final = client.get(progress, HTTP_HX_REQUEST="true")
    assert "hx-trigger" not in final.content.decode()
    assert final["HX-Refresh"] == "true"  # once, to load the finished runs' rows
    assert "hx-trigger" not in client.get(reverse("eval_detail", args=[evaluation.public_id])).content.decode()


@pytest.mark.django_db
def test_it_pages_examples_fifty_at_a_time_keeping_the_filter(client, alice):
    evaluation = stored_eval(alice, {"a": [FAIL] * 120, "b": [FAIL] * 120})
    assert shown(client, evaluation, show="all_wrong") == list(range(50))
    assert shown(client, evaluation, show="all_wrong", page=3) == list(range(100, 120))
    html = client.get(reverse("eval_detail", args=[evaluation.public_id]), {"show": "all_wrong"}).content.decode()
    assert 'href="?show=all_wrong&amp;page=2"' in html


@pytest.mark.django_db
def test_it_shows_accuracy_per_label_and_a_confusion_table(client, alice):
    evaluation = stored_eval(alice, {"a": [PASS] * 5})
    pairs = [("card", "card"), ("card", "card"), ("card", "refund"), ("refund", "refund"), ("refund", "hello")]
    run = evaluation.runs.get()
    run.aggregates = {"exact_match": {"mean": 0.6, "low": 0.2, "high": 1.0, "n": 5, "labels": label_summary(pairs)}}
    run.save()

    response = client.get(reverse("eval_detail", args=[evaluation.public_id]))
    (table,) = response.context["label_tables"]
    assert table["columns"] == ["card", "refund", "(other)"]
    assert [(row["label"], row["n"], row["accuracy"]) for row in table["rows"]] == [
        ("card", 3, 2 / 3),
        ("refund", 2, 0.5),
    ]
    assert [[cell["count"] for cell in row["cells"]] for row in table["rows"]] == [[2, 1, 0], [0, 1, 1]]
    assert 'data-testid="label-table"' in response.content.decode()


def test_a_confusion_table_keeps_the_thirty_most_frequent_labels():
    pairs = [(f"label{i:02}", f"label{i:02}") for i in range(35) for _ in range(1 + (i % 3 == 0))]
    pairs.append(("label00", "label34"))  # label34 is among the least frequent: its column is left out
    table = pages.label_table(label_summary(pairs))
    assert (table["shown"], table["total"], table["hidden"]) == (30, 35, 5)
    assert table["columns"][-1] == "other labels"
    first = table["rows"][0]
    assert first["label"] == "label00" and first["cells"][-1]["count"] == 1
    assert sum(cell["count"] for row in table["rows"] for cell in row["cells"]) == sum(
        1 for ref, _ in pairs if ref in {row["label"] for row in table["rows"]}
    )


def test_the_diff_marks_words_escapes_html_and_splits_chinese_by_character():
    assert pages.word_diff("the cat sat", "the dog sat") == "the <del>cat</del><ins>dog</ins> sat"
    assert pages.word_diff("a <b>", "a <i>") == "a &lt;<del>b</del><ins>i</ins>&gt;"
    assert pages.word_diff("我喜欢猫", "我喜欢狗") == "我喜欢<del>猫</del><ins>狗</ins>"
    assert pages.word_diff("same", "same") == "same"
