"""Evaluation runs end to end in this process: the API's shapes and refusals, answering through the serving
engine, grading, aggregates, cancel and resume, and a judge grader on a served tiny model."""

import json
import threading
import time

import pytest
from django.contrib.auth import get_user_model

from evals_app import services
from evals_app.models import Eval, EvalOutputItem, EvalRun
from finetune_site.errors import InvalidInput
from finetune_site.models import ApiKey

from .conftest import BASE, EXACT, chat_file, run_now

ROUGE = {
    "type": "text_similarity",
    "name": "rouge",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
    "evaluation_metric": "rouge_l",
    "pass_threshold": 0.5,
}


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch):
    """Runs are executed here with run_now; what would be sent to the worker is recorded."""
    sent = []
    monkeypatch.setattr(services, "_enqueue", sent.append)
    return sent


def auth(user):
    return {"HTTP_AUTHORIZATION": f"Bearer {ApiKey.issue(user, name='t')[1]}"}


def create_eval(client, headers, criteria, prefix="/v1"):
    return client.post(
        f"{prefix}/evals",
        {"name": "codes", "data_source_config": {"type": "chat"}, "testing_criteria": criteria},
        content_type="application/json",
        **headers,
    )


def run_source(model, dataset, **extra):
    return {"type": "completions", "model": model, "source": {"type": "file_id", "id": dataset.public_id}, **extra}


@pytest.mark.django_db
def test_a_grader_naming_a_missing_field_or_an_unknown_judge_is_refused_naming_the_field(client, alice):
    headers = auth(alice)
    missing = create_eval(client, headers, [{**EXACT, "reference": "{{item.answer}}"}])
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "testing_criteria[0].reference"
    assert "item.answer" in missing.json()["error"]["message"]
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "no-such-model",
        "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}],
    }
    unknown = create_eval(client, headers, [EXACT, judge], prefix="/api/paas/v4")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "testing_criteria[1].model"
    assert "no-such-model" in unknown.json()["error"]["message"]
    with pytest.raises(InvalidInput) as refused:
        services.eval_create(owner=alice, data_source_config={"type": "custom"}, testing_criteria=[EXACT])
    assert refused.value.param == "data_source_config.item_schema"
    assert Eval.objects.count() == 0


@pytest.mark.django_db
def test_a_run_is_refused_at_once_for_a_missing_model_or_file(client, alice, heldout):
    headers = auth(alice)
    eval_id = create_eval(client, headers, [EXACT]).json()["id"]
    for source, param in (
        (run_source("nope", heldout), "data_source.model"),
        ({**run_source(BASE, heldout), "source": {"type": "file_id", "id": "file-nope"}}, "data_source.source.id"),
        (run_source(BASE, heldout, sampling_params={"temperature": 9}), "data_source.sampling_params.temperature"),
    ):
        response = client.post(
            f"/v1/evals/{eval_id}/runs", {"data_source": source}, content_type="application/json", **headers
        )
        assert response.status_code in (400, 404), response.content
        assert response.json()["error"]["param"] == param
    assert EvalRun.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_run_answers_every_example_through_the_engine_and_aggregates(
    client, alice, heldout, card, _no_broker, settings
):
    # One answer at a time, as the chat call below is answered: in bfloat16 (the engine's choice on
    # some CPUs) an answer computed in a batch may differ from one computed alone after a few tokens.
    settings.FT_EVAL_CONCURRENCY = 1
    headers = auth(alice)
    evaluation = create_eval(client, headers, [EXACT, ROUGE]).json()
    assert evaluation["object"] == "eval" and evaluation["data_source_config"]["type"] == "custom"
    ids = []
    for model in (BASE, card.model_id):
        created = client.post(
            f"/v1/evals/{evaluation['id']}/runs",
            {"name": model, "data_source": run_source(model, heldout, sampling_params={"max_completion_tokens": 6})},
            content_type="application/json",
            **headers,
        ).json()
        assert created["status"] == "queued" and created["progress"] == {"done": 0, "total": 6}
        ids.append(created["id"])
    assert len(_no_broker) == 2  # each run was sent to the evaluations worker
    for run in EvalRun.objects.all():
        run_now(run)
    for run_id in ids:
        run = client.get(f"/v1/evals/{evaluation['id']}/runs/{run_id}", **headers).json()
        assert run["status"] == "completed", run["error"]
        counts = run["result_counts"]
        assert counts["total"] == 6 and counts["passed"] + counts["failed"] + counts["errored"] == 6
        rouge = run["aggregates"]["rouge"]
        assert rouge["n"] == 6 and rouge["low"] <= rouge["mean"] <= rouge["high"]
        assert run["per_model_usage"][0]["completion_tokens"] > 0
        items = client.get(f"/v1/evals/{evaluation['id']}/runs/{run_id}/output_items?limit=100", **headers).json()
        assert len(items["data"]) == 6 and not items["has_more"]
        for item in items["data"]:
            assert item["object"] == "eval.run.output_item"
            answer = item["sample"]["output"][0]["content"]
            exact = item["results"][0]
            assert exact["name"] == "exact" and exact["passed"] == (
                answer.strip() == item["datasource_item"]["reference"]
            )
            assert item["sample"]["input"] == item["datasource_item"]["input"]
    # The same prompts, answered again by a chat call, give the same greedy answers the run stored.
    first = EvalOutputItem.objects.filter(run__model=BASE).order_by("index").first()
    chat = client.post(
        "/v1/chat/completions",
        {"model": BASE, "messages": first.input, "max_tokens": 6, "temperature": 0},
        content_type="application/json",
        **headers,
    ).json()
    assert chat["choices"][0]["message"]["content"] == first.output_text


@pytest.mark.django_db(transaction=True)
def test_cancel_stops_a_run_and_resume_answers_only_what_is_left(alice, settings, monkeypatch):
    # The tiny model answers all 60 in about two seconds: the worker must look for the cancel more often
    # than once a second for it to land mid-run.
    monkeypatch.setattr(services, "WATCH_SECONDS", 0.05)
    settings.FT_EVAL_CONCURRENCY = 1
    settings.FT_EVAL_MAX_TOKENS = 24
    data = chat_file(alice, [(f"Say the number {i} please.", str(i)) for i in range(60)])
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    run = services.run_create(evaluation=evaluation, data_source=run_source(BASE, data))
    worker = threading.Thread(target=services.run_execute, kwargs={"run_id": run.pk})
    worker.start()
    deadline = time.monotonic() + 120
    while EvalRun.objects.get(pk=run.pk).done < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    services.run_cancel(run=EvalRun.objects.get(pk=run.pk))
    worker.join(timeout=120)
    run.refresh_from_db()
    assert run.status == EvalRun.CANCELED and 2 <= run.done < 60
    kept = dict(run.items.values_list("index", "public_id"))
    assert len(kept) == run.done
    services.run_resume(run=run)
    run = run_now(run)
    assert run.status == EvalRun.COMPLETED and run.done == 60 and run.result_counts["total"] == 60
    assert dict(run.items.filter(index__in=kept).values_list("index", "public_id")) == kept
    assert sorted(run.items.values_list("index", flat=True)) == list(range(60))


@pytest.mark.django_db(transaction=True)
def test_a_judge_served_here_is_asked_with_a_fixed_seed_and_an_unparsed_answer_is_an_error(alice, heldout):
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": BASE,
        "input": [
            {"role": "user", "content": "Score 0 to 1. Reference: {{item.reference}} Answer: {{sample.output_text}}"}
        ],
        "range": [0, 1],
        "pass_threshold": 0.5,
        "sampling_params": {"seed": 7, "temperature": 1.0, "max_completion_tokens": 6},
    }
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT, judge])
    runs = [run_now(services.run_create(evaluation=evaluation, data_source=run_source(BASE, heldout))) for _ in "ab"]
    for run in runs:
        assert run.status == EvalRun.COMPLETED
    answers = [[item.results[1] for item in run.items.order_by("index")] for run in runs]
    # A fixed seed: the judge (a served random tiny model) answers the same both times.
    assert [r["detail"].get("answer") for r in answers[0]] == [r["detail"].get("answer") for r in answers[1]]
    judged = answers[0]
    assert all(r["detail"].get("answer") for r in judged), judged
    unparsed = [r for r in judged if r["error"]]
    aggregate = runs[0].aggregates["judge"]
    assert aggregate["errors"] == len(unparsed) and aggregate["n"] == 6 - len(unparsed)
    # The other grader still scored every example: the run went on past the judge's errors.
    assert runs[0].aggregates["exact"]["n"] == 6 and runs[0].aggregates["exact"]["errors"] == 0
    assert runs[0].result_counts["errored"] == len(unparsed)


@pytest.mark.django_db
def test_nobody_sees_another_users_evals(client, alice, heldout):
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    run = services.run_create(evaluation=evaluation, data_source=run_source(BASE, heldout))
    bob = get_user_model().objects.create_user("bob", password="pw-bob-123")
    headers = auth(bob)
    for path in (
        f"/v1/evals/{evaluation.public_id}",
        f"/v1/evals/{evaluation.public_id}/runs",
        f"/v1/evals/{evaluation.public_id}/runs/{run.public_id}",
        f"/v1/evals/{evaluation.public_id}/runs/{run.public_id}/output_items",
    ):
        assert client.get(path, **headers).status_code == 404, path
    assert client.get("/v1/evals", **headers).json()["data"] == []
    assert client.post(f"/v1/evals/{evaluation.public_id}/runs/{run.public_id}", **headers).status_code == 404
    # Bob may not evaluate Alice's file either.
    mine = services.eval_create(owner=bob, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    with pytest.raises(Exception) as refused:
        services.run_create(evaluation=mine, data_source=run_source(BASE, heldout))
    assert getattr(refused.value, "param", None) == "data_source.source.id"


@pytest.mark.django_db
def test_an_eval_file_in_openais_item_shape_and_a_template_are_read(alice):
    lines = [{"item": {"question": f"q{i}", "answer": f"a{i}"}} for i in range(3)]
    evaluation = services.eval_create(
        owner=alice,
        data_source_config={
            "type": "custom",
            "item_schema": {"type": "object", "properties": {"question": {}, "answer": {}}},
        },
        testing_criteria=[{**EXACT, "reference": "{{item.answer}}"}],
    )
    source = {
        "type": "completions",
        "model": BASE,
        "source": {"type": "file_content", "content": lines},
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "Q: {{item.question}}"}]},
    }
    run = services.run_create(evaluation=evaluation, data_source=source)
    assert run.total == 3
    bad = {**source, "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.nope}}"}]}}
    with pytest.raises(InvalidInput) as refused:
        services.run_create(evaluation=evaluation, data_source=bad)
    assert refused.value.param == "data_source.input_messages"
    assert json.dumps(run.data_source)  # stored as given


@pytest.mark.django_db
def test_the_sweep_queues_again_a_run_whose_worker_went_quiet(alice, heldout, _no_broker, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    monkeypatch.setattr("evals_app.services.waiting_task_args", lambda *a, **k: [])
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    quiet, alive, lost = (
        services.run_create(evaluation=evaluation, data_source=run_source(BASE, heldout)) for _ in "abc"
    )
    long_ago = timezone.now() - timedelta(seconds=services.STALE_RUN_SECONDS + 5)
    EvalRun.objects.filter(pk=quiet.pk).update(status=EvalRun.IN_PROGRESS, heartbeat_at=long_ago)
    EvalRun.objects.filter(pk=alive.pk).update(status=EvalRun.IN_PROGRESS, heartbeat_at=timezone.now())
    EvalRun.objects.filter(pk=lost.pk).update(
        created_at=timezone.now() - timedelta(seconds=services.LOST_QUEUED_SECONDS + 5)
    )
    _no_broker.clear()
    assert sorted(services.reconcile_runs()) == sorted([quiet.public_id, lost.public_id])
    assert sorted(_no_broker) == sorted([quiet.pk, lost.pk])
    assert EvalRun.objects.get(pk=quiet.pk).status == EvalRun.QUEUED
    assert EvalRun.objects.get(pk=alive.pk).status == EvalRun.IN_PROGRESS


@pytest.mark.django_db(transaction=True)
def test_default_graders_on_data_mixing_tool_calls_and_text_score_every_row(alice):
    from django.core.files.base import ContentFile

    from datasets_app.models import Dataset
    from llm.evals.graders import default_criteria

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    rows = [
        {
            "messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "tool_calls": [call]}],
            "tools": [tool],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "tools": [tool]},
    ]
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    data = Dataset.objects.create(
        owner=alice, filename="t.jsonl", bytes=len(text), status=Dataset.PROCESSED, examples=2
    )
    data.normalized.save("t.jsonl", ContentFile(text), save=True)
    items = services.run_items.read_items(alice, run_source(BASE, data))
    assert items[1]["reference_tool_calls"] == [] and items[0]["tools"] == [tool]
    criteria = default_criteria(items)
    assert [c["name"] for c in criteria] == ["tool_call", "exact_match"]
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=criteria)
    run = run_now(services.run_create(evaluation=evaluation, data_source=run_source(BASE, data)))
    assert run.status == EvalRun.COMPLETED
    for item in run.items.all():
        assert [r["error"] for r in item.results] == [None, None], item.results
    assert run.aggregates["tool_call"]["n"] == 2 and run.aggregates["exact_match"]["n"] == 2


@pytest.mark.django_db
def test_the_sweep_keeps_a_cancel_and_fails_a_run_that_keeps_losing_its_worker(alice, heldout, _no_broker):
    from datetime import timedelta

    from django.utils import timezone

    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    cancelled, doomed = (
        services.run_create(evaluation=evaluation, data_source=run_source(BASE, heldout)) for _ in "ab"
    )
    long_ago = timezone.now() - timedelta(seconds=services.STALE_RUN_SECONDS + 5)
    quiet = {"status": EvalRun.IN_PROGRESS, "heartbeat_at": long_ago}
    EvalRun.objects.filter(pk=cancelled.pk).update(control="cancel", attempts=1, **quiet)
    EvalRun.objects.filter(pk=doomed.pk).update(attempts=services.MAX_RUN_ATTEMPTS, **quiet)
    _no_broker.clear()
    assert services.reconcile_runs() == [] and _no_broker == []
    assert EvalRun.objects.get(pk=cancelled.pk).status == EvalRun.CANCELED
    failed = EvalRun.objects.get(pk=doomed.pk)
    assert failed.status == EvalRun.FAILED and "not queued again" in failed.error["message"]


@pytest.mark.django_db
def test_a_worker_that_lost_its_run_writes_nothing_more(alice, heldout):
    evaluation = services.eval_create(owner=alice, data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    run = services.run_create(evaluation=evaluation, data_source=run_source(BASE, heldout))
    EvalRun.objects.filter(pk=run.pk).update(status=EvalRun.IN_PROGRESS, attempts=1)
    old_worker = EvalRun.objects.get(pk=run.pk)
    # The sweep took it for lost and a second worker claimed it (attempt 2).
    EvalRun.objects.filter(pk=run.pk).update(attempts=2)
    assert services._heartbeat(old_worker) == services._LOST
    services._finish(old_worker, EvalRun.CANCELED)
    assert EvalRun.objects.get(pk=run.pk).status == EvalRun.IN_PROGRESS
