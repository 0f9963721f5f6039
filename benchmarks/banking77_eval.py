"""A real-data example: fine-tune SmolLM2-135M-Instruct on Banking77, then evaluate tuned against base.

Everything goes through the product, in this process (a temporary FT_HOME with its own SQLite
database, as `benchmarks.evals_speed` sets it up):

1. a training file of --per-intent queries of each of the 77 intents from
   ../shared/data/banking77/train.csv (seeded pick), each a chat line: the user asks
   "Classify this banking query into one intent label: <query>", the assistant answers the label;
   uploaded with `dataset_create` and validated with `dataset_validate`;
2. a LoRA job (`jobs_app.services.job_create`) trained by `job_run`, as the training worker runs it;
3. --test-rows queries from test.csv (Banking77's own test split: none is in the training file),
   asked the same way, one eval with `string_check` eq against the label, and a run for the base
   model and one for the tuned model, each executed by `evals_app.services.run_execute`.

Prints the accuracy of base and tuned with their 95% bootstrap intervals, and the time of each
phase. Skips with a message when ../shared/data/banking77 is absent.

    python -m benchmarks.banking77_eval [--per-intent 8] [--test-rows 200] [--epochs 3]
"""

import argparse
import csv
import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.evals_speed import BANKING77, CLASSIFY, SOURCE_HOME, eval_runs, interval, start_product
from llm.bundled import BUNDLED_MODEL_ID, prepare_bundled_model
from llm.evals.graders import EXACT_MATCH


def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [(row["text"].strip(), row["category"].strip()) for row in csv.DictReader(handle) if row["text"].strip()]


def training_rows(rows: list[tuple[str, str]], per_intent: int, seed: int) -> list[tuple[str, str]]:
    """per_intent rows of each intent, picked and ordered by the seed."""
    shuffled = rows[:]
    random.Random(f"train/{seed}").shuffle(shuffled)
    taken: dict[str, int] = defaultdict(int)
    picked = []
    for text, label in shuffled:
        if taken[label] < per_intent:
            taken[label] += 1
            picked.append((text, label))
    return picked


def chat_line(text: str, label: str) -> str:
    messages = [{"role": "user", "content": CLASSIFY.format(text=text)}, {"role": "assistant", "content": label}]
    return json.dumps({"messages": messages})


def upload_training_file(user, rows: list[tuple[str, str]]):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from datasets_app import services as dataset_services
    from datasets_app.models import Dataset

    content = "".join(chat_line(text, label) + "\n" for text, label in rows).encode()
    upload = SimpleUploadedFile("banking77-train.jsonl", content, content_type="application/jsonl")
    dataset = dataset_services.dataset_create(owner=user, upload=upload)
    dataset_services.dataset_validate(dataset_id=dataset.pk)
    dataset.refresh_from_db()
    if dataset.status != Dataset.PROCESSED:
        raise SystemExit(f"the training file was refused: {dataset.status_details}")
    return dataset


def fine_tune(user, dataset, hyperparameters: dict, seed: int):
    """Create the job and train it here, as the training worker does; the finished job."""
    from jobs_app import services as job_services
    from jobs_app.models import FineTuningJob

    job = job_services.job_create(
        owner=user,
        model=BUNDLED_MODEL_ID,
        training_file=dataset.public_id,
        hyperparameters=hyperparameters,
        suffix="banking77",
        seed=seed,
    )
    job_services.job_run(job_id=job.pk, worker="banking77-bench")
    job.refresh_from_db()
    if job.status != FineTuningJob.SUCCEEDED:
        raise SystemExit(f"the job ended {job.status}: {job.error}")
    return job


def final_train_loss(job) -> str:
    from jobs_app.models import JobEvent

    last = job.events.filter(type=JobEvent.METRICS, data__has_key="train_loss").order_by("-step").first()
    return f"{last.data['train_loss']:.4f}" if last else "none recorded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-intent", type=int, default=8, help="training queries of each of the 77 intents")
    parser.add_argument("--test-rows", type=int, default=200, help="unseen test queries to evaluate on")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-multiplier", type=float, default=5.0, help="times LoRA's base learning rate 2e-4")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if not (BANKING77 / "train.csv").is_file() or not (BANKING77 / "test.csv").is_file():
        print(f"Skipped: Banking77 is not at {BANKING77} (train.csv and test.csv are needed).")
        return
    began = time.perf_counter()
    train = training_rows(read_rows(BANKING77 / "train.csv"), args.per_intent, args.seed)
    seen = {text.casefold() for text, _ in train}
    test = [row for row in read_rows(BANKING77 / "test.csv") if row[0].casefold() not in seen]
    random.Random(f"test/{args.seed}").shuffle(test)
    test = test[: args.test_rows]
    model_dir = prepare_bundled_model(SOURCE_HOME / "models" / BUNDLED_MODEL_ID)
    hyperparameters = {
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate_multiplier": args.lr_multiplier,
        "lora_rank": 16,
        "max_seq_len": 256,
    }
    with tempfile.TemporaryDirectory() as scratch:
        user = start_product(Path(scratch) / "home", {BUNDLED_MODEL_ID: model_dir})
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        longest_label = max(len(tokenizer(label)["input_ids"]) for _, label in train + test)
        max_tokens = longest_label + 4
        print(
            f"Banking77: {len(train)} training queries ({args.per_intent} of each of "
            f"{len({label for _, label in train})} intents), {len(test)} unseen test queries; "
            f"LoRA r 16 all linear layers, {hyperparameters}, seed {args.seed}; "
            f"greedy answers of up to {max_tokens} tokens",
            flush=True,
        )
        started = time.perf_counter()
        dataset = upload_training_file(user, train)
        job = fine_tune(user, dataset, hyperparameters, args.seed)
        train_seconds = time.perf_counter() - started
        print(
            f"  fine-tuned {job.fine_tuned_model} in {train_seconds:.0f} s "
            f"({job.total_steps or job.step} steps, {job.trained_tokens} tokens, "
            f"final train loss {final_train_loss(job)})",
            flush=True,
        )

        items = [
            {"input": [{"role": "user", "content": CLASSIFY.format(text=text)}], "reference": label}
            for text, label in test
        ]
        models = [BUNDLED_MODEL_ID, job.fine_tuned_model]
        runs = eval_runs(user, models, items, {"max_completion_tokens": max_tokens, "temperature": 0}, [EXACT_MATCH])
        print(f"  evaluated both models on {len(items)} queries in {runs['seconds']:.0f} s", flush=True)
        base, tuned = (runs[model].aggregates["exact_match"] for model in models)
        labels = runs[job.fine_tuned_model].aggregates["exact_match"].get("labels") or {}
        base_right, tuned_right = (_right(runs[model]) for model in models)
    total = time.perf_counter() - began
    gained, lost = len(tuned_right - base_right), len(base_right - tuned_right)
    print()
    print(f"Banking77 intent accuracy (string_check eq) on {len(items)} unseen test queries:")
    print(f"  base  {BUNDLED_MODEL_ID}: {interval(base)}")
    print(f"  tuned {job.fine_tuned_model}: {interval(tuned)}")
    print(
        f"  base -> tuned: {base['mean']:.3f} -> {tuned['mean']:.3f}; tuned right where base was wrong {gained}, "
        f"the reverse {lost}"
    )
    if labels:
        worst = sorted(labels["per_label"].items(), key=lambda entry: (entry[1]["accuracy"], -entry[1]["n"]))[:3]
        print("  tuned's weakest intents: " + ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in worst))
    print(
        f"  whole script {total / 60:.1f} min (training {train_seconds / 60:.1f} min, "
        f"evaluation {runs['seconds'] / 60:.1f} min)"
    )


def _right(run) -> set[int]:
    """The indexes of the examples the run's model answered right."""
    return set(run.items.filter(status="pass").values_list("index", flat=True))


if __name__ == "__main__":
    main()
