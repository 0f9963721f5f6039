"""Automatic evaluation at a job's end: held-out runs for base, tuned and each checkpoint, the forgetting
check on the general set, and what the job page and the model card say about them."""

import shutil

import pytest
from django.urls import reverse

from evals_app import auto, services
from evals_app.models import Eval, EvalRun
from evals_app.summaries import best_checkpoint, forgetting_summary, heldout_summary
from jobs_app import services as job_services
from jobs_app import transitions
from jobs_app.models import Checkpoint, FineTuningJob
from jobs_app.sink import JobSink

from .conftest import BASE, job_on, run_now

SMALL_GENERAL_SET = 3


@pytest.fixture(autouse=True)
def small_runs(settings, monkeypatch):
    settings.FT_AUTO_EVAL = True
    settings.FT_AUTO_EVAL_MAX_EXAMPLES = 2
    settings.FT_FORGETTING_DROP = 0.05
    lines = auto.general_set()
    monkeypatch.setattr(auto, "general_set", lambda: lines[:SMALL_GENERAL_SET])


@pytest.fixture
def sent(monkeypatch) -> list[int]:
    """The run pks sent to the evaluations worker (nothing reaches a broker)."""
    pks: list[int] = []
    monkeypatch.setattr(services, "_enqueue", pks.append)
    return pks


@pytest.fixture
def evaluate(sent, django_capture_on_commit_callbacks):
    """evaluate_job as the on-commit hook calls it, with the runs' own on-commit sends done."""

    def run(job):
        with django_capture_on_commit_callbacks(execute=True):
            return auto.evaluate_job(job.pk)

    return run


@pytest.fixture
def job(card, tmp_path):
    """The card's succeeded job, with its model id recorded and two checkpoints whose adapters load."""
    job = card.job
    job.fine_tuned_model = card.model_id
    job.step = job.total_steps = 30
    job.resolved = {**job.resolved, "total_steps": 30}  # the job page reads it
    job.save()
    for step in (10, 20):
        folder = tmp_path / "run" / "checkpoints" / f"step-{step}"
        shutil.copytree(card.path, folder / "adapter")  # where resolve_model looks for a checkpoint's weights
        Checkpoint.objects.create(job=job, step=step, path=str(folder))
    return job


def runs_by_role(evaluation: Eval) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for run in evaluation.runs.order_by("id"):
        roles.setdefault(run.metadata["role"], []).append(run.model)
    return roles


def finish(run: EvalRun, score: float) -> None:
    """Record a completed run whose first grader scored `score` on average."""
    grader = run.eval.testing_criteria[0]["name"]
    EvalRun.objects.filter(pk=run.pk).update(
        status=EvalRun.COMPLETED,
        done=run.total,
        aggregates={grader: {"mean": score, "low": score - 0.1, "high": score + 0.1, "n": run.total}},
    )


def run_of(job, kind: str, role: str, step: int | None = None) -> EvalRun:
    runs = EvalRun.objects.filter(eval__job=job, eval__kind=kind, metadata__role=role)
    if step is not None:
        runs = runs.filter(metadata__step=str(step))
    return runs.get()


@pytest.mark.django_db
def test_it_queues_held_out_runs_for_base_tuned_and_each_checkpoint_and_the_general_set(
    job, sent, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        auto.evaluate_job_later(job)
    assert callbacks

    heldout = Eval.objects.get(job=job, kind=Eval.AUTO)
    assert heldout.name == f"{job.fine_tuned_model} held-out"
    assert [c["name"] for c in heldout.testing_criteria] == ["exact_match"]  # short answers: "code 3"
    checkpoints = [f"{job.fine_tuned_model}:ckpt-step-10", f"{job.fine_tuned_model}:ckpt-step-20"]
    assert runs_by_role(heldout) == {"base": [BASE], "tuned": [job.fine_tuned_model], "checkpoint": checkpoints}
    for run in heldout.runs.all():
        assert run.total == 2 and run.data_source["limit"] == 2
        assert run.data_source["source"] == {"type": "file_id", "id": job.validation_file.public_id}

    general = Eval.objects.get(job=job, kind=Eval.FORGETTING)
    assert runs_by_role(general) == {"base": [BASE], "tuned": [job.fine_tuned_model]}
    assert general.testing_criteria[0]["operation"] == "ilike"
    assert all(run.total == SMALL_GENERAL_SET for run in general.runs.all())

    assert sorted(sent) == sorted(EvalRun.objects.filter(eval__job=job).values_list("pk", flat=True))
    assert len(sent) == 6


@pytest.mark.django_db
def test_a_job_that_continued_from_a_fine_tuned_model_is_compared_with_that_model(evaluate, job, sent):
    FineTuningJob.objects.filter(pk=job.pk).update(init_model=job.fine_tuned_model)  # a model the owner has

    evaluate(job)

    assert run_of(job, Eval.AUTO, "base").model == job.fine_tuned_model
    assert run_of(job, Eval.FORGETTING, "base").model == job.fine_tuned_model


@pytest.mark.django_db
def test_it_evaluates_nothing_when_turned_off_or_for_a_preference_job(
    job, sent, settings, django_capture_on_commit_callbacks
):
    settings.FT_AUTO_EVAL = False
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        auto.evaluate_job_later(job)
    assert callbacks == []

    settings.FT_AUTO_EVAL = True
    job.objective = FineTuningJob.DPO
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        auto.evaluate_job_later(job)
    assert callbacks == []
    assert not Eval.objects.exists() and sent == []


@pytest.mark.django_db
def test_a_job_without_validation_data_gets_only_the_forgetting_check(evaluate, job, sent):
    FineTuningJob.objects.filter(pk=job.pk).update(validation_file=None, validation_file_ref="")

    made = evaluate(job)

    assert [e.kind for e in made] == [Eval.FORGETTING]
    assert list(Eval.objects.filter(job=job).values_list("kind", flat=True)) == [Eval.FORGETTING]
    assert heldout_summary(job) is None and best_checkpoint(job) is None
    assert len(sent) == 2


@pytest.mark.django_db
def test_a_second_call_adds_nothing(evaluate, job, sent):
    evaluate(job)
    assert evaluate(job) == []
    assert Eval.objects.filter(job=job).count() == 2 and len(sent) == 6


@pytest.mark.django_db
def test_models_that_cannot_answer_are_left_out_and_the_others_still_run(evaluate, job, sent):
    # A base model this server no longer offers: it cannot answer, nor can the job's checkpoints (adapters
    # on it); the fine-tuned model's card still names the base it was trained on.
    FineTuningJob.objects.filter(pk=job.pk).update(base_model="no-such-base")

    evaluate(job)

    assert runs_by_role(Eval.objects.get(job=job, kind=Eval.AUTO)) == {"tuned": [job.fine_tuned_model]}
    assert runs_by_role(Eval.objects.get(job=job, kind=Eval.FORGETTING)) == {"tuned": [job.fine_tuned_model]}
    assert len(sent) == 2


@pytest.mark.django_db(transaction=True)
def test_a_failure_inside_the_automatic_evaluation_never_fails_the_job(alice, heldout, monkeypatch, caplog):
    def broken(**kwargs):
        raise RuntimeError("the evaluations database is on fire")

    monkeypatch.setattr(services, "eval_create", broken)
    job = job_on(alice, heldout)
    assert transitions.start(job, worker="w1")

    job_services._finish_run(job, {"train_tokens": 10, "stopped": None}, None, JobSink(job))

    job.refresh_from_db()
    assert job.status == FineTuningJob.SUCCEEDED and job.fine_tuned_model == job.fine_tuned_model_id
    assert not Eval.objects.exists()
    assert "on fire" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_the_runs_score_and_the_job_page_and_model_card_show_the_result(evaluate, client, job, sent):
    evaluate(job)
    waiting = heldout_summary(job)
    assert (waiting["status"], waiting["done"], waiting["total"], waiting["sentence"]) == ("running", 0, 8, None)
    page = client.get(reverse("job_detail", args=[job.public_id])).content.decode()
    assert "evaluating… 0/8" in page

    for pk in sent:
        assert run_now(EvalRun.objects.get(pk=pk)).status == EvalRun.COMPLETED

    summary = heldout_summary(job)
    base, tuned = run_of(job, Eval.AUTO, "base"), run_of(job, Eval.AUTO, "tuned")
    scores = {run.model: [item.results[0]["score"] for item in run.items.all()] for run in (base, tuned)}
    assert summary["base"] == sum(scores[BASE]) / 2 and summary["tuned"] == sum(scores[job.fine_tuned_model]) / 2
    expected = f"exact match {summary['base']:.2f} → {summary['tuned']:.2f} on 2 held-out examples"
    assert (summary["status"], summary["done"], summary["n"], summary["sentence"]) == ("done", 8, 2, expected)
    assert summary["url"] == reverse("eval_detail", args=[base.eval.public_id])
    general = forgetting_summary(job)
    assert general["status"] == "done" and general["n"] == SMALL_GENERAL_SET and general["sentence"]
    assert best_checkpoint(job)["model_id"] in {job.fine_tuned_model, *(c.model_id for c in job.checkpoints.all())}

    page = client.get(reverse("job_detail", args=[job.public_id])).content.decode()
    assert expected in page and "evaluating…" not in page
    square = client.get(reverse("model_list")).content.decode()
    assert expected in square and 'data-testid="best-checkpoint"' in square


@pytest.mark.django_db
def test_the_best_checkpoint_is_the_highest_scored_and_the_later_step_on_a_tie(evaluate, job, sent, client):
    evaluate(job)
    finish(run_of(job, Eval.AUTO, "base"), 0.12)
    finish(run_of(job, Eval.AUTO, "tuned"), 0.5)
    finish(run_of(job, Eval.AUTO, "checkpoint", 10), 0.7)
    ckpt_20 = run_of(job, Eval.AUTO, "checkpoint", 20)
    assert best_checkpoint(job) is None  # step 20 is still running: no pick yet

    finish(ckpt_20, 0.7)
    best = best_checkpoint(job)
    assert (best["model_id"], best["step"], best["score"], best["is_final"]) == (ckpt_20.model, 20, 0.7, False)
    assert heldout_summary(job)["sentence"] == "exact match 0.12 → 0.50 on 2 held-out examples"
    assert heldout_summary(job)["tuned_interval"] == pytest.approx((0.4, 0.6))

    page = client.get(reverse("job_detail", args=[job.public_id])).content.decode()
    shown = page.split('data-testid="best-checkpoint"')[1].split("</p>")[0]
    assert f'<code style="user-select: all">{ckpt_20.model}</code>' in shown
    assert f"?model={ckpt_20.model.replace(':', '%3A')}" in shown  # a link to deploy it

    finish(run_of(job, Eval.AUTO, "tuned"), 0.7)  # the final model ties: it is the latest step
    assert best_checkpoint(job)["model_id"] == job.fine_tuned_model and best_checkpoint(job)["is_final"]


@pytest.mark.django_db
def test_the_forgetting_check_warns_only_beyond_the_threshold(evaluate, job, sent, client):
    evaluate(job)
    finish(run_of(job, Eval.FORGETTING, "base"), 0.9)
    tuned = run_of(job, Eval.FORGETTING, "tuned")

    finish(tuned, 0.8)
    dropped = forgetting_summary(job)
    assert dropped["warning"] and dropped["sentence"] == "general questions 0.90 → 0.80 on 3 questions"
    assert (
        'data-testid="forgetting-warning"' in client.get(reverse("job_detail", args=[job.public_id])).content.decode()
    )
    assert 'data-testid="forgetting-warning"' in client.get(reverse("model_list")).content.decode()

    finish(tuned, 0.88)
    assert not forgetting_summary(job)["warning"]
    assert (
        'data-testid="forgetting-warning"'
        not in client.get(reverse("job_detail", args=[job.public_id])).content.decode()
    )
