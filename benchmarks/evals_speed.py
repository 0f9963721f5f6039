"""Evaluation runs against sequential chat calls: 200 short-answer prompts on two models, in one process.

Both paths answer through the serving path chat uses (`deployments_app.chat.serving.open_events`),
on the same engine pool with the same models loaded:

- baseline: 400 chat calls one after another (every prompt to the base model, then to the LoRA);
- evaluation: one eval (string_check eq against the reference) and one run per model, each
  executed by `evals_app.services.run_execute` as the evaluations worker executes it, one run
  after the other, with FT_EVAL_CONCURRENCY requests in flight so the engine batches them.

Same prompts, same max_tokens, greedy decoding. Prints both wall times, their ratio (target >= 5x),
and how many of the 400 answers are the same on both paths. The models: the bundled
SmolLM2-135M-Instruct and a LoRA of it with random non-zero B (r 16, alpha 32, all linear layers:
the product's defaults), registered as the user's fine-tuned model. The prompts: Banking77 test
queries asking for their intent label (../shared/data/banking77/test.csv), or synthetic sums when
that file is absent.

The product runs in this process in a temporary FT_HOME with its own SQLite database. Its Celery
broker is an in-memory one that nothing reads: the benchmark executes each queued run itself.

    python -m benchmarks.evals_speed [--prompts 200] [--max-tokens 16]
"""

import argparse
import asyncio
import csv
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import django

from llm.bundled import BUNDLED_MODEL_ID, prepare_bundled_model
from llm.evals.graders import EXACT_MATCH

REPO = Path(__file__).resolve().parent.parent
SOURCE_HOME = Path(os.environ.get("FT_HOME", REPO / "var"))
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
LORA_MODEL_ID = f"ft:{BUNDLED_MODEL_ID}:bench:evals-speed:r16"
CLASSIFY = "Classify this banking query into one intent label: {text}"


# --- The product, in this process -------------------------------------------------


def start_product(home: Path, models: dict[str, Path]):
    """Django in this process, FT_HOME at home (a fresh SQLite database, the base models linked in); a user."""
    (home / "models").mkdir(parents=True)
    for name, folder in models.items():
        (home / "models" / name).symlink_to(folder.resolve())
    os.environ.update(FT_HOME=str(home), FT_AUTO_EVAL="0", DJANGO_SETTINGS_MODULE="finetune_site.settings")
    os.environ.pop("DATABASE_URL", None)  # never a real database
    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from finetune_site.celery import app

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    app.conf.broker_url = "memory://"  # queued tasks go nowhere: the benchmark runs them here
    call_command("migrate", verbosity=0)
    return get_user_model().objects.create_user("bench", password="bench-pw-123")


def eval_runs(user, models: list[str], items: list[dict], sampling: dict, criteria: list[dict]) -> dict:
    """Create one eval over the items and one run per model, and execute the runs here, one after the other.

    Returns {model: the finished EvalRun}, and the seconds the runs took under "seconds".
    """
    from evals_app import services

    evaluation = services.eval_create(owner=user, data_source_config={"type": "chat"}, testing_criteria=criteria)
    content = [{"item": item} for item in items]
    runs = [
        services.run_create(
            evaluation=evaluation,
            data_source={
                "type": "completions",
                "model": model,
                "source": {"type": "file_content", "content": content},
                "sampling_params": sampling,
            },
        )
        for model in models
    ]
    started = time.perf_counter()
    for run in runs:
        services.run_execute(run_id=run.pk)
    seconds = time.perf_counter() - started
    for run in runs:
        run.refresh_from_db()
        if run.status != run.COMPLETED:
            raise SystemExit(f"the run of {run.model} ended {run.status}: {run.error}")
    return {"seconds": seconds, **{run.model: run for run in runs}}


def interval(aggregate: dict) -> str:
    """A mean with its 95% interval, as "0.530 [0.460, 0.600]"."""
    return f"{aggregate['mean']:.3f} [{aggregate['low']:.3f}, {aggregate['high']:.3f}]"


# --- This benchmark ---------------------------------------------------------------


def short_answer_items(count: int) -> tuple[list[dict], str]:
    """count items {"input", "reference"} with short references, and where they came from."""
    test_file = BANKING77 / "test.csv"
    if test_file.is_file():
        with open(test_file, encoding="utf-8", newline="") as handle:
            rows = [(row["text"].strip(), row["category"].strip()) for row in csv.DictReader(handle)]
        random.Random("evals-speed").shuffle(rows)
        items = [
            {"input": [{"role": "user", "content": CLASSIFY.format(text=text)}], "reference": label}
            for text, label in rows[:count]
        ]
        return items, f"Banking77 test queries ({test_file})"
    rng = random.Random("evals-speed")
    pairs = [(rng.randint(2, 99), rng.randint(2, 99)) for _ in range(count)]
    items = [
        {"input": [{"role": "user", "content": f"What is {a}+{b}? Answer with a number."}], "reference": str(a + b)}
        for a, b in pairs
    ]
    return items, "synthetic sums (Banking77 not found)"


async def sequential_answers(user, models: list[str], items: list[dict], max_tokens: int) -> dict[str, list[str]]:
    """Every item to every model, one chat call at a time, through the serving path chat uses."""
    from deployments_app.chat import protocol
    from deployments_app.chat.serving import collect, open_events

    answers: dict[str, list[str]] = {}
    for model in models:
        answers[model] = []
        for item in items:
            params = protocol.parse_chat_body(
                {"model": model, "messages": item["input"], "max_tokens": max_tokens, "temperature": 0}
            )
            completion = await collect(await open_events(user, params))
            answers[model].append(completion.content if completion else "")
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    from benchmarks.serving_load import build_lora_adapter

    model_dir = prepare_bundled_model(SOURCE_HOME / "models" / BUNDLED_MODEL_ID)
    with tempfile.TemporaryDirectory() as scratch:
        user = start_product(Path(scratch) / "home", {BUNDLED_MODEL_ID: model_dir})
        from django.conf import settings

        from deployments_app.models import ModelCard

        adapter = build_lora_adapter(model_dir, Path(scratch) / "lora-r16")
        ModelCard.objects.create(
            model_id=LORA_MODEL_ID,
            owner=user,
            base_model=BUNDLED_MODEL_ID,
            method="lora",
            path=str(adapter),
            hyperparameters={"lora_rank": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        )
        models = [BUNDLED_MODEL_ID, LORA_MODEL_ID]
        items, source = short_answer_items(args.prompts)
        print(f"{len(items)} prompts from {source}; models {', '.join(models)}", flush=True)
        print(
            f"greedy, max_tokens {args.max_tokens}; FT_EVAL_CONCURRENCY {settings.FT_EVAL_CONCURRENCY}, "
            f"FT_MAX_BATCH {settings.FT_MAX_BATCH}, {serving_dtype()}, torch threads {_torch_threads()}",
            flush=True,
        )
        asyncio.run(sequential_answers(user, models, items[:2], args.max_tokens))  # both models loaded: not timed

        started = time.perf_counter()
        sequential = asyncio.run(sequential_answers(user, models, items, args.max_tokens))
        sequential_seconds = time.perf_counter() - started
        print(f"  sequential chat calls: {len(models) * len(items)} in {sequential_seconds:.1f} s", flush=True)

        sampling = {"max_completion_tokens": args.max_tokens, "temperature": 0}
        runs = eval_runs(user, models, items, sampling, [EXACT_MATCH])
        evaluated = {model: _outputs(runs[model]) for model in models}
        print(f"  evaluation runs: {len(models) * len(items)} answers in {runs['seconds']:.1f} s", flush=True)

    answers = len(models) * len(items)
    ratio = sequential_seconds / runs["seconds"]
    print()
    print(
        f"evaluating {len(items)} prompts on {len(models)} models ({answers} answers, up to {args.max_tokens} tokens):"
    )
    print(f"  {answers} sequential chat calls   {sequential_seconds:8.1f} s")
    print(f"  {len(models)} evaluation runs (batched)    {runs['seconds']:8.1f} s")
    print(f"  ratio {ratio:.2f}x (target >= 5x)")
    same_total = 0
    for model in models:
        same = sum(a == b for a, b in zip(sequential[model], evaluated[model], strict=True))
        same_total += same
        print(
            f"  {model}: same greedy answer on both paths {same} of {len(items)}; "
            f"exact match {interval(runs[model].aggregates['exact_match'])}"
        )
    print(f"  same answer on both paths: {same_total} of {answers} ({100 * same_total / answers:.1f}%)")
    differing = [(a, b) for model in models for a, b in zip(sequential[model], evaluated[model], strict=True) if a != b]
    if differing:
        shared = statistics.median(len(os.path.commonprefix([a, b])) for a, b in differing)
        longest = statistics.median(max(len(a), len(b)) for a, b in differing)
        print(
            f"  the {len(differing)} that differ share their first {shared:.0f} characters (median, of {longest:.0f})"
        )


def _outputs(run) -> list[str]:
    return list(run.items.order_by("index").values_list("output_text", flat=True))


def serving_dtype() -> str:
    """The dtype the serving engine computes in here (FT_SERVING_DTYPE on FT_DEVICE)."""
    from django.conf import settings

    from llm.serve.pool import resolve_device, resolve_dtype

    return str(resolve_dtype(settings.FT_SERVING_DTYPE, resolve_device(settings.FT_DEVICE))).removeprefix("torch.")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
