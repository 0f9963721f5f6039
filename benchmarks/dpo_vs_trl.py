"""Preference benchmark: our engine's DPO against TRL's DPOTrainer on the same LoRA job.

    python -m benchmarks.dpo_vs_trl [--train-pairs 48] [--eval-pairs 24] [--batch-size 8] [--epochs 2]
        [--lr 2e-4] [--dpo-beta 0.1] [--scheduler linear] [--warmup-ratio 0] [--seed 42]

Same model (SmolLM2-135M-Instruct), same preference pairs (Banking77: a
customer query after a short system message; preferred answer: the right
intent label, non-preferred: a wrong one, phrased the same way), same LoRA
(r 16, alpha 32, dropout 0, all linear layers), beta, learning rate and
schedule, pairs per step, epochs, seed and pair order (the engine's seeded
per-epoch shuffle, fed to TRL in sequence). Each trainer runs in its own
process, one after the other, on the CPU in fp32:

- engine       python -m llm.train train --objective dpo ... (its CLI, as users run it)
- trl_default  DPOTrainer with DPOConfig's defaults except what must match the job
               (so gradient checkpointing on, padded batches, the reference
               log-probs computed during training, as DPOConfig has them)

Both evaluate on the held-out pairs once, at the end, as part of the work timed.

What TRL is given. DPOTrainer (TRL 1.16) has no pre-tokenized input: it always
tokenizes prompt, prompt + chosen and prompt + rejected itself. Given
conversations, its chat template renders "<|im_end|>\\n" after each answer, so
TRL would train the newline after the end-of-turn marker as part of both
answers; the engine's answers end with the marker. So TRL gets the same pairs
in its standard (text) form: the prompt rendered by the model's template with
the generation prompt, each answer the template's text after it up to its
end-of-turn marker (the layout's trailing whitespace left out, as the engine
leaves it out of the trained span). TRL appends no EOS to these, since they end
with the tokenizer's EOS (<|im_end|>) already.

Checked, and the run fails (exit status 1) when it does not hold: the token
ids TRL's data collator hands the model (input ids where the attention mask is
1, split by its completion mask) equal the engine's rendering
(llm.train.preference.load_pairs) for every pair, training and held-out.

Reported: each step's loss and learning rate in both and the largest relative
loss difference; the first step's policy and reference log-probs; the
held-out reward accuracy each trainer reports itself, and the one a single
function here computes for both adapters (base + adapter as the policy, the
adapter disabled as the reference, one pair at a time); wall time and peak
RSS (wait4) of each whole process and the speed ratio. Targets (loss and
reward accuracy within 1%, engine >= 2x as fast, peak RSS <= TRL's) are
reported, not asserted: timings depend on what else the machine is doing.

Results go to stdout as a table and to bench-results/dpo_vs_trl.json (or
--results). Without Banking77 (../shared/data/banking77/train.csv, or --rows)
the benchmark says so and exits 0. Internal: the same module runs the TRL and
evaluation children (--child).
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .train_vs_trl import (
    CHILD_TIMEOUT_S,
    describe_load,
    ensure_model,
    fmt,
    job_settings,
    run_child,
    self_peak_rss_mb,
    trl_batch_split,
)

# Importing train_vs_trl above set the hub to offline (HF_*_OFFLINE) for this process and its children.

ROOT = Path(__file__).resolve().parent.parent
FT_HOME = Path(os.environ.get("FT_HOME", ROOT / "var"))
DEFAULT_MODEL = FT_HOME / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "bench-results" / "dpo_vs_trl.json"
RUNS = ("engine", "trl_default")
TARGETS = {"vs_trl_default": 2.0, "loss_rel_diff": 0.01, "reward_accuracy_rel_diff": 0.01}
"""The issue's targets: 2x TRL's DPO defaults on CPU (whole process), loss and held-out reward accuracy within 1%."""


# --- Job and data ------------------------------------------------------------------


def dpo_job(args) -> dict:
    """What both trainers must share: the SFT benchmark's job, with DPO's objective, beta and this schedule."""
    job = job_settings(args) | {"objective": "dpo", "dpo_beta": args.dpo_beta, "scheduler": args.scheduler}
    del job["loss_on"]  # DPO trains the answers, whatever loss_on says
    return job


def intent_answer(intent: str) -> str:
    """A short reply naming an intent; the right and the wrong label are phrased alike."""
    return f"Intent: {intent}. This request is about {intent.replace('_', ' ')}."


def build_pairs(rows: list[tuple[str, str]], count: int, *, seed: int) -> list[dict]:
    """count preference pairs in OpenAI's shape: the right intent preferred over a wrong one, both seeded."""
    from .data import SYSTEM_PROMPTS

    intents = sorted({intent for _, intent in rows})
    rng = random.Random(f"pairs/{seed}")
    pairs = []
    for query, intent in rows[:count]:
        wrong = rng.choice([other for other in intents if other != intent])
        pairs.append(
            {
                "input": {
                    "messages": [
                        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                        {"role": "user", "content": query},
                    ]
                },
                "preferred_output": [{"role": "assistant", "content": intent_answer(intent)}],
                "non_preferred_output": [{"role": "assistant", "content": intent_answer(wrong)}],
            }
        )
    return pairs


def trl_text(tokenizer, pair: dict) -> dict:
    """The pair in TRL's standard form: template text of the prompt, and of each answer through its end marker."""
    messages = pair["input"]["messages"]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    texts = {"prompt": prompt}
    for key, answer in (("chosen", pair["preferred_output"]), ("rejected", pair["non_preferred_output"])):
        full = tokenizer.apply_chat_template(messages + answer, tokenize=False)
        if not full.startswith(prompt):
            raise SystemExit("the chat template renders the prompt differently before an answer: no common prompt")
        texts[key] = full[len(prompt) :].rstrip()  # the layout's whitespace after the end-of-turn marker
    return texts


def pair_tokens(pair) -> dict:
    """A RenderedPair as plain lists, for the children's spec."""
    return {
        "prompt_ids": pair.prompt_ids,
        "chosen_ids": pair.chosen_ids,
        "rejected_ids": pair.rejected_ids,
        "chosen_trained": pair.chosen_trained,
        "rejected_trained": pair.rejected_trained,
    }


# --- Held-out rewards (one definition for every adapter) ---------------------------


def answer_logprob(model, prompt_ids: list[int], answer_ids: list[int], trained: list[bool]) -> float:
    """Sum of the log-probabilities of the trained answer tokens after the prompt, one sequence, no padding."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(answer_ids, device=device)[:, None])[:, 0]
    return logprobs[torch.tensor(trained, device=device)].sum().item()


def held_out_rewards(model, pairs: list[dict], beta: float) -> dict:
    """DPO's loss, reward accuracy and margin over pairs: the adapter as the policy, the adapter disabled as the reference."""
    import torch
    import torch.nn.functional as F

    model.eval()
    chosen_rewards, rejected_rewards = [], []
    with torch.no_grad():
        for pair in pairs:
            answers = (
                (pair["chosen_ids"], pair["chosen_trained"]),
                (pair["rejected_ids"], pair["rejected_trained"]),
            )
            policy = [answer_logprob(model, pair["prompt_ids"], ids, trained) for ids, trained in answers]
            with model.disable_adapter():
                reference = [answer_logprob(model, pair["prompt_ids"], ids, trained) for ids, trained in answers]
            chosen_rewards.append(beta * (policy[0] - reference[0]))
            rejected_rewards.append(beta * (policy[1] - reference[1]))
    margins = torch.tensor(chosen_rewards, dtype=torch.float64) - torch.tensor(rejected_rewards, dtype=torch.float64)
    return {
        "loss": (-F.logsigmoid(margins)).mean().item(),
        "reward_accuracy": (margins > 0).double().mean().item(),
        "reward_margin": margins.mean().item(),
        "rewards_chosen": statistics.mean(chosen_rewards),
        "rewards_rejected": statistics.mean(rejected_rewards),
        "pairs": len(pairs),
    }


# --- Parent: data, children, table ------------------------------------------------


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.child == "trl":
        return trl_child(json.loads(Path(args.spec).read_text()), Path(args.out))
    if args.child == "eval":
        return eval_child(json.loads(Path(args.spec).read_text()), Path(args.out))
    return benchmark(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo_vs_trl", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="model folder (default: $FT_HOME/models/SmolLM2-135M-Instruct, built from the bundled GGUF if missing)",
    )
    parser.add_argument("--train-pairs", type=int, default=48)
    parser.add_argument("--eval-pairs", type=int, default=24, help="held-out pairs, evaluated once at the end")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="pairs per optimizer step; must divide --train-pairs (TRL sees the epochs end to end)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4, help="default: the engine's LoRA rate")
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument(
        "--scheduler",
        choices=("linear", "cosine", "constant"),
        default="linear",
        help="default: linear, TRL's default; with --warmup-ratio 0 the two trainers' schedules are the same function",
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.0,
        help="above 0 the warmups differ (step 0 gets lr 0 in transformers, lr/(warmup+1) in the engine)",
    )
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)} (default: both)")
    parser.add_argument("--engine-extra", default="", help='extra engine CLI flags, e.g. "--micro-batch-tokens 1024"')
    parser.add_argument("--workdir", help="keep data, logs and adapters here (default: a temporary folder, removed)")
    parser.add_argument("--results", help=f"JSON file (default: {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--rows", help="Banking77 train.csv (default: ../shared/data/banking77/train.csv)")
    parser.add_argument("--child", choices=("trl", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def benchmark(args) -> int:
    from .data import BANKING77_TRAIN

    args.device = "cpu"  # fp32 on the CPU: the job this benchmark measures (job_settings reads it)
    runs = [name.strip() for name in (args.runs or ",".join(RUNS)).split(",") if name.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}")
    if args.train_pairs % args.batch_size:
        # TRL gets the epochs laid end to end; the engine starts each epoch with a fresh batch.
        raise SystemExit(f"--batch-size {args.batch_size} must divide --train-pairs {args.train_pairs}")
    rows_file = Path(args.rows) if args.rows else BANKING77_TRAIN
    if not rows_file.is_file():
        print(f"dpo_vs_trl: skipped, Banking77 not found at {rows_file} (give --rows FILE)")
        return 0

    started, load_start = time.time(), os.getloadavg()
    model_dir = ensure_model(Path(args.model))
    keep = args.workdir is not None
    workdir = Path(args.workdir).resolve() if keep else Path(tempfile.mkdtemp(prefix="dpo_vs_trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"load average at start: {describe_load(load_start)} ({os.cpu_count()} CPUs); work folder {workdir}", flush=True
    )
    try:
        spec = _prepare(args, model_dir, rows_file, workdir)
        measured = []
        for name in runs:
            print(f"{name} ...", flush=True)
            result = _run_trainer(name, spec, workdir / name, args.engine_extra.split())
            measured.append(result)
            print("    " + _one_line(result), flush=True)
        print("held-out rewards of every adapter ...", flush=True)
        evaluation = _evaluate(spec, measured, workdir)
        report = _report(args, spec, measured, evaluation, load_start, os.getloadavg(), time.time() - started)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = Path(args.results) if args.results else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {results}", flush=True)
    differing = [run for run in report["runs"] if run.get("token_check", {}).get("differing_pairs")]
    if differing or any("error" in run for run in report["runs"]):
        print("FAILED: " + "; ".join(_failure(run) for run in report["runs"] if _failure(run)), file=sys.stderr)
        return 1
    return 0


def _prepare(args, model_dir: Path, rows_file: Path, workdir: Path) -> dict:
    """Build the pairs, render them as the engine does and as TRL will be given them; write the children's spec."""
    from transformers import AutoTokenizer

    from llm.train.data import epoch_order
    from llm.train.preference import load_pairs

    from .data import load_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, source = load_rows(rows_file, seed=args.seed)
    pairs = build_pairs(rows, args.train_pairs + args.eval_pairs, seed=args.seed)
    train, held_out = pairs[: args.train_pairs], pairs[args.train_pairs :]
    files = {"train": workdir / "train.jsonl", "eval": workdir / "eval.jsonl"}
    for split, split_pairs in (("train", train), ("eval", held_out)):
        files[split].write_text("".join(json.dumps(pair) + "\n" for pair in split_pairs))

    # The engine's own rendering, through its own loader: what its forward passes are built from.
    rendered = {
        split: load_pairs(files[split], tokenizer, max_seq_len=args.max_seq_len, name=f"{split}_file").examples
        for split in files
    }
    truncated = sum(pair.truncated_tokens > 0 for split in rendered.values() for pair in split)
    if truncated:
        raise SystemExit(
            f"{truncated} pairs exceed --max-seq-len {args.max_seq_len}: the trainers truncate differently"
        )
    order = [i for epoch in range(args.epochs) for i in epoch_order(len(train), seed=args.seed, epoch=epoch)]
    per_device, accumulation = trl_batch_split(args.batch_size)
    train_pairs = rendered["train"]
    data = {
        "source": source,
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
        "prompt_tokens_mean": round(statistics.mean(len(pair.prompt_ids) for pair in train_pairs), 1),
        "answer_tokens_mean": round(
            statistics.mean(len(ids) for pair in train_pairs for ids in (pair.chosen_ids, pair.rejected_ids)), 1
        ),
        "pair_tokens_per_epoch": sum(pair.tokens for pair in train_pairs),
        "sequence_tokens_per_epoch": sum(
            2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in train_pairs
        ),
    }
    spec = {
        "model": str(model_dir),
        "train_file": str(files["train"]),
        "eval_file": str(files["eval"]),
        "job": dpo_job(args),
        "trl_per_device_batch": per_device,
        "trl_gradient_accumulation": accumulation,
        "order": order,
        "trl_train": [trl_text(tokenizer, pair) for pair in train],
        "trl_eval": [trl_text(tokenizer, pair) for pair in held_out],
        "expected_train": [pair_tokens(pair) for pair in train_pairs],
        "expected_eval": [pair_tokens(pair) for pair in rendered["eval"]],
        "data": data,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    spec["spec_file"] = str(workdir / "spec.json")
    print(
        f"data: {data['train_pairs']} train / {data['eval_pairs']} held-out pairs from {source}; prompts "
        f"{data['prompt_tokens_mean']} tokens, answers {data['answer_tokens_mean']} on average; "
        f"{len(order)} pairs in {len(order) // args.batch_size} steps",
        flush=True,
    )
    return spec


def _run_trainer(name: str, spec: dict, out: Path, engine_extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    job = spec["job"]
    if name == "engine":
        flags = {
            "--model": spec["model"],
            "--train-file": spec["train_file"],
            "--validation-file": spec["eval_file"],
            "--out": str(out),
            "--objective": "dpo",
            "--dpo-beta": job["dpo_beta"],
            "--method": "lora",
            "--epochs": job["epochs"],
            "--batch-size": job["batch_size"],
            "--lr": job["lr"],
            "--lora-r": job["lora_r"],
            "--lora-alpha": job["lora_alpha"],
            "--lora-dropout": job["lora_dropout"],
            "--target-modules": job["target_modules"],
            "--warmup-ratio": job["warmup_ratio"],
            "--scheduler": job["scheduler"],
            "--seed": job["seed"],
            "--max-seq-len": job["max_seq_len"],
            "--eval-every": 0,  # validate once, at the end, as the TRL child does
            "--device": job["device"],
        }
        command = [sys.executable, "-m", "llm.train", "train"]
        command += [part for flag, value in flags.items() for part in (flag, str(value))] + engine_extra
    else:
        command = [sys.executable, "-m", "benchmarks.dpo_vs_trl", "--child", "trl"]
        command += ["--spec", spec["spec_file"], "--out", str(out)]
    process = run_child(command, out / "log.txt", CHILD_TIMEOUT_S[job["device"]])
    result = {"run": name, "command": " ".join(command), **process}
    try:
        result.update(_engine_result(out, job["dpo_beta"]) if name == "engine" else _trl_result(out))
    except (OSError, ValueError, KeyError, IndexError) as error:
        result.update({"error": f"{type(error).__name__}: {error}", "log_tail": (out / "log.txt").read_text()[-3000:]})
        return result
    result["adapter"] = str(out / "adapter")
    return result


def _engine_result(out: Path, beta: float) -> dict:
    """The engine's per-step metrics, its end-of-run evaluation and its summary."""
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [metric for metric in metrics if metric.get("kind") == "metric"]
    evaluation = [metric for metric in metrics if metric.get("kind") == "eval"][-1]
    return {
        "steps": [
            {
                "step": metric["step"],
                "loss": metric["loss"],
                "lr": metric["lr"],
                "reward_accuracy": metric["reward_accuracy"],
                "reward_margin": metric["reward_margin"],
                "logps_chosen": metric["logps_chosen"],
                "logps_rejected": metric["logps_rejected"],
                # The reference's mean log-prob: the policy's minus the mean reward over beta (both are means).
                "ref_logps_chosen": metric["logps_chosen"] - metric["rewards_chosen"] / beta,
                "ref_logps_rejected": metric["logps_rejected"] - metric["rewards_rejected"] / beta,
            }
            for metric in steps
        ],
        "own_eval": {
            "loss": evaluation["eval_loss"],
            "reward_accuracy": evaluation["eval_reward_accuracy"],
            "reward_margin": evaluation.get("eval_reward_margin"),
        },
        "loop_seconds": summary["train_seconds"],
        "own_peak_memory_mb": summary["peak_memory_mb"],
        "settings": {
            key: json.loads((out / "config.json").read_text()).get(key)
            for key in ("gradient_checkpointing", "micro_batch_tokens", "warmup_steps", "total_steps")
        }
        if (out / "config.json").is_file()
        else {},
    }


def _trl_result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _evaluate(spec: dict, measured: list[dict], workdir: Path) -> dict:
    """held_out_rewards() of every adapter, in one child process."""
    adapters = {result["run"]: result["adapter"] for result in measured if "adapter" in result}
    if not adapters:
        return {}
    eval_spec = workdir / "eval_spec.json"
    eval_spec.write_text(
        json.dumps(
            {
                "model": spec["model"],
                "pairs": spec["expected_eval"],
                "beta": spec["job"]["dpo_beta"],
                "adapters": adapters,
            }
        )
    )
    out = workdir / "eval"
    command = [sys.executable, "-m", "benchmarks.dpo_vs_trl", "--child", "eval", "--spec", str(eval_spec)]
    process = run_child(command + ["--out", str(out)], out / "log.txt", CHILD_TIMEOUT_S["cpu"])
    try:
        return json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        print((out / "log.txt").read_text()[-3000:], file=sys.stderr)
        return {"error": f"evaluation failed (exit {process['exit_code']})"}


# --- Children --------------------------------------------------------------------


class _ForwardedPairs:
    """Wraps TRL's data collator and keeps, per pair, the tokens the model is handed.

    A collated batch holds the chosen sequences, then the rejected ones, each
    right-padded; the attention mask marks the real tokens and the completion
    mask the answer. A pair is kept as (prompt, chosen, rejected, well-formed),
    well-formed meaning both masks are prompt-then-answer and the prompts agree.
    """

    def __init__(self, collate):
        self.collate = collate
        self.phase = "setup"
        self.pairs: dict[str, list[tuple[list[int], list[int], list[int], bool]]] = {"train": [], "eval": []}

    def __call__(self, examples):
        batch = self.collate(examples)
        rows = []
        for ids, attention, completion in zip(
            batch["input_ids"].tolist(),
            batch["attention_mask"].tolist(),
            batch["completion_mask"].tolist(),
            strict=True,
        ):
            seen = [(token, answer) for token, real, answer in zip(ids, attention, completion, strict=True) if real]
            prompt = [token for token, answer in seen if not answer]
            reply = [token for token, answer in seen if answer]
            rows.append((prompt, reply, [answer for _, answer in seen] == [0] * len(prompt) + [1] * len(reply)))
        half = len(rows) // 2
        for (prompt, chosen, chosen_ok), (other_prompt, rejected, rejected_ok) in zip(
            rows[:half], rows[half:], strict=True
        ):
            self.pairs.setdefault(self.phase, []).append(
                (prompt, chosen, rejected, chosen_ok and rejected_ok and prompt == other_prompt)
            )
        return batch


def compare_tokens(forwarded: list[tuple], expected: list[dict]) -> dict:
    """How many forwarded pairs differ from the engine's rendering, and where the first one does."""
    differing, first = 0, None
    for k, ((prompt, chosen, rejected, well_formed), want) in enumerate(zip(forwarded, expected, strict=False)):
        problems = [
            name
            for name, ok in (
                ("prompt", prompt == want["prompt_ids"]),
                ("chosen", chosen == want["chosen_ids"]),
                ("rejected", rejected == want["rejected_ids"]),
                ("masks", well_formed),
            )
            if not ok
        ]
        if problems:
            differing += 1
            if first is None:
                first = {"pair": k, "differs_in": problems, "trl": [prompt, chosen, rejected], "engine": want}
    if len(forwarded) != len(expected):
        differing += abs(len(forwarded) - len(expected))
        first = first or {"pairs_forwarded": len(forwarded), "pairs_expected": len(expected)}
    return {"pairs": len(expected), "differing_pairs": differing, "first_difference": first}


def trl_child(spec: dict, out: Path) -> int:
    """Train with TRL's DPOTrainer in this process, then evaluate on the held-out pairs; write out/result.json."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as transformers_logging
    from trl import DPOConfig, DPOTrainer

    transformers_logging.disable_progress_bar()
    job = spec["job"]
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the engine uses: every core this process may run on

    # The engine's pair order (its seeded per-epoch shuffle), epochs end to end, read in sequence.
    train = Dataset.from_list([spec["trl_train"][i] for i in spec["order"]])
    held_out = Dataset.from_list(spec["trl_eval"])
    args = DPOConfig(
        output_dir=str(out / "trainer"),
        # What must match the job:
        per_device_train_batch_size=spec["trl_per_device_batch"],
        gradient_accumulation_steps=spec["trl_gradient_accumulation"],
        num_train_epochs=1,  # the epochs are laid end to end in `train`
        learning_rate=job["lr"],
        lr_scheduler_type=job["scheduler"],
        warmup_steps=job["warmup_ratio"],  # below 1: a ratio of the steps
        beta=job["dpo_beta"],
        max_grad_norm=job["grad_clip"],
        weight_decay=job["weight_decay"],
        seed=job["seed"],
        data_seed=job["seed"],
        train_sampling_strategy="sequential",
        max_length=job["max_seq_len"],
        bf16=False,  # DPOConfig's default is bf16; the job is fp32 on the CPU
        fp16=False,
        use_cpu=True,
        # Measurement plumbing, not training behaviour:
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # Loaded here, in fp32, so nothing between DPOTrainer's set_seed and get_peft_model draws random numbers:
    # the initial adapter is then the engine's (it seeds right before get_peft_model too).
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    peft_config = LoraConfig(
        r=job["lora_r"],
        lora_alpha=job["lora_alpha"],
        lora_dropout=job["lora_dropout"],
        target_modules=job["target_modules"],
        task_type="CAUSAL_LM",
        bias="none",
    )

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            forwarded.phase = "train"
            self.begin = time.monotonic()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.monotonic()
            forwarded.phase = "after_train"

    clock = Clock()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    forwarded = trainer.data_collator = _ForwardedPairs(trainer.data_collator)

    trainer.train()
    forwarded.phase = "eval"
    evaluation = trainer.evaluate()
    trainer.model.save_pretrained(out / "adapter")

    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "rewards/chosen" in entry]
    expected_train = [spec["expected_train"][i] for i in spec["order"]]
    result = {
        "steps": [
            {
                "step": entry["step"],
                "loss": entry["loss"],
                "lr": entry["learning_rate"],
                "reward_accuracy": entry["rewards/accuracies"],
                "reward_margin": entry["rewards/margins"],
                "logps_chosen": entry["logps/chosen"],
                "logps_rejected": entry["logps/rejected"],
                "ref_logps_chosen": entry["logps/chosen"] - entry["rewards/chosen"] / job["dpo_beta"],
                "ref_logps_rejected": entry["logps/rejected"] - entry["rewards/rejected"] / job["dpo_beta"],
            }
            for entry in logged
        ],
        # TRL averages its per-batch reward accuracies: the share of pairs when the batches are of one size.
        "own_eval": {
            "loss": evaluation["eval_loss"],
            "reward_accuracy": evaluation["eval_rewards/accuracies"],
            "reward_margin": evaluation["eval_rewards/margins"],
        },
        "loop_seconds": clock.end - clock.begin,
        "own_peak_memory_mb": self_peak_rss_mb(),
        "token_check": {
            "train": compare_tokens(forwarded.pairs["train"], expected_train),
            "eval": compare_tokens(forwarded.pairs["eval"], spec["expected_eval"]),
        },
        "settings": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "per_device_eval_batch_size": args.per_device_eval_batch_size,
            "gradient_checkpointing": args.gradient_checkpointing,
            "padding_free": trainer.padding_free,
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "max_length": args.max_length,
            "loss_type": args.loss_type,
            "optim": str(args.optim),
            "bf16": args.bf16,
            "attn_implementation": trainer.model.config._attn_implementation,
            "cpu_threads": torch.get_num_threads(),
            "warmup_steps": args.get_warmup_steps(trainer.state.max_steps),
            "total_steps": trainer.state.max_steps,
        },
    }
    check = result["token_check"]
    result["token_check"] = {
        "pairs": check["train"]["pairs"] + check["eval"]["pairs"],
        "differing_pairs": check["train"]["differing_pairs"] + check["eval"]["differing_pairs"],
        **check,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


def eval_child(spec: dict, out: Path) -> int:
    """held_out_rewards() of every adapter, each on a freshly loaded fp32 base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results = {}
    for name, adapter in spec["adapters"].items():
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32), adapter
        )
        began = time.monotonic()
        results[name] = {
            **held_out_rewards(model, spec["pairs"], spec["beta"]),
            "seconds": round(time.monotonic() - began, 1),
        }
        print(name, results[name], flush=True)
        del model
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(results, indent=2))
    return 0


# --- Report ------------------------------------------------------------------------


def _failure(run: dict) -> str:
    if "error" in run:
        return f"{run['run']} failed: {run['error']} (log {run['log']})"
    check = run.get("token_check", {})
    if check.get("differing_pairs"):
        first = check["train"]["first_difference"] or check["eval"]["first_difference"]
        return (
            f"{run['run']} forwarded {check['differing_pairs']} of {check['pairs']} pairs with other tokens than "
            f"the engine's rendering; first: {json.dumps(first)[:600]}"
        )
    return ""


def _one_line(result: dict) -> str:
    if "error" in result:
        return f"FAILED (exit {result['exit_code']}): {result['error']}; log {result['log']}"
    losses = [step["loss"] for step in result["steps"]]
    return (
        f"process {result['process_seconds']:.1f} s (loop {result['loop_seconds']:.1f} s), peak RSS "
        f"{result['peak_rss_mb']:.0f} MB, loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
        f"held-out reward accuracy {result['own_eval']['reward_accuracy']:.3f}, load before {describe_load(result['load_before'])}"
    )


def _relative(value, base):
    return (value - base) / abs(base) if value is not None and base else None


def _report(args, spec, measured, evaluation, load_start, load_end, seconds) -> dict:
    ok = {result["run"]: result for result in measured if "error" not in result}
    for name, result in ok.items():
        result["eval"] = evaluation.get(name)
    engine, trl = ok.get("engine"), ok.get("trl_default")

    comparison, targets = {}, {}
    if engine and trl:
        pairs = list(zip(engine["steps"], trl["steps"], strict=False))
        loss_diffs = [_relative(ours["loss"], theirs["loss"]) for ours, theirs in pairs]
        comparison = {
            "steps_compared": len(pairs),
            "steps_engine": len(engine["steps"]),
            "steps_trl": len(trl["steps"]),
            "loss_rel_diff": loss_diffs,
            "max_abs_loss_rel_diff": max(abs(diff) for diff in loss_diffs) if loss_diffs else None,
            "max_abs_lr_diff": max((abs(ours["lr"] - theirs["lr"]) for ours, theirs in pairs), default=None),
            "speed_ratio": trl["process_seconds"] / engine["process_seconds"],
            "loop_speed_ratio": trl["loop_seconds"] / engine["loop_seconds"],
            "peak_rss_diff_mb": engine["peak_rss_mb"] - trl["peak_rss_mb"],
            "own_eval_reward_accuracy_rel_diff": _relative(
                engine["own_eval"]["reward_accuracy"], trl["own_eval"]["reward_accuracy"]
            ),
            "eval_reward_accuracy_rel_diff": _relative(
                (engine.get("eval") or {}).get("reward_accuracy"), (trl.get("eval") or {}).get("reward_accuracy")
            ),
        }

        def check(name, value, passed):
            targets[name] = {"value": value, "met": passed if value is not None else None}

        same_steps = len(engine["steps"]) == len(trl["steps"])
        worst = comparison["max_abs_loss_rel_diff"]
        check(
            "per-step loss within 1% of trl_default",
            worst,
            same_steps and worst is not None and worst <= TARGETS["loss_rel_diff"],
        )
        for label, key in (
            ("held-out reward accuracy within 1% (own evaluations)", "own_eval_reward_accuracy_rel_diff"),
            ("held-out reward accuracy within 1% (one function)", "eval_reward_accuracy_rel_diff"),
        ):
            value = comparison[key]
            check(label, value, value is not None and abs(value) <= TARGETS["reward_accuracy_rel_diff"])
        ratio = comparison["speed_ratio"]
        check(f">= {TARGETS['vs_trl_default']}x trl_default (whole process)", ratio, ratio >= TARGETS["vs_trl_default"])
        extra = comparison["peak_rss_diff_mb"]
        check("peak RSS <= trl_default", extra, extra <= 0)

    _print_table(args, spec, measured, ok, comparison, targets, load_start, load_end, seconds)
    import peft
    import torch
    import transformers
    import trl as trl_package

    return {
        "benchmark": "dpo_vs_trl",
        "command": "python -m benchmarks.dpo_vs_trl " + " ".join(sys.argv[1:]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(seconds, 1),
        "model": spec["model"],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl_package.__version__,
            "peft": peft.__version__,
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "job": spec["job"],
        "trl_batch": {
            "per_device_train_batch_size": spec["trl_per_device_batch"],
            "gradient_accumulation_steps": spec["trl_gradient_accumulation"],
        },
        "data": spec["data"],
        "comparison": comparison,
        "targets": targets,
        "runs": measured,
        "evaluation": evaluation,
    }


def _print_table(args, spec, measured, ok, comparison, targets, load_start, load_end, seconds) -> None:
    job, data = spec["job"], spec["data"]
    engine, trl = ok.get("engine"), ok.get("trl_default")
    print(
        f"\n=== Preference fine-tuning (DPO): engine vs TRL DPOTrainer (CPU, fp32, LoRA r{job['lora_r']}/"
        f"a{job['lora_alpha']} {job['target_modules']}, beta {job['dpo_beta']}) ==="
    )
    print(
        f"model {Path(spec['model']).name}; {data['train_pairs']} train pairs, {data['eval_pairs']} held-out "
        f"(prompts {data['prompt_tokens_mean']} tokens, answers {data['answer_tokens_mean']} on average); batch "
        f"{job['batch_size']} pairs/step (TRL {spec['trl_per_device_batch']} x {spec['trl_gradient_accumulation']}), "
        f"{job['epochs']} epoch(s), lr {job['lr']}, {job['scheduler']}, warmup ratio {job['warmup_ratio']}, "
        f"seed {job['seed']}"
    )
    steps = max((len(result["steps"]) for result in ok.values()), default=0)
    if steps:
        print("\nper step (loss; learning rate; reward accuracy of the step's pairs):")
        print(
            f"{'step':>4} {'engine loss':>11} {'TRL loss':>9} {'rel diff':>9} {'engine lr':>10} {'TRL lr':>10} "
            f"{'engine acc':>10} {'TRL acc':>8}"
        )
        for k in range(steps):
            ours = engine["steps"][k] if engine and k < len(engine["steps"]) else {}
            theirs = trl["steps"][k] if trl and k < len(trl["steps"]) else {}
            diff = _relative(ours.get("loss"), theirs.get("loss"))
            print(
                f"{k + 1:>4} {fmt(ours.get('loss'), '{:.5f}'):>11} {fmt(theirs.get('loss'), '{:.5f}'):>9} "
                f"{fmt(diff, '{:+.3%}'):>9} {fmt(ours.get('lr'), '{:.3g}'):>10} {fmt(theirs.get('lr'), '{:.3g}'):>10} "
                f"{fmt(ours.get('reward_accuracy'), '{:.3f}'):>10} {fmt(theirs.get('reward_accuracy'), '{:.3f}'):>8}"
            )
        if comparison:
            print(
                f"largest |relative loss difference| {fmt(comparison['max_abs_loss_rel_diff'], '{:.3%}')}; "
                f"largest learning-rate difference {fmt(comparison['max_abs_lr_diff'], '{:.2g}')}"
            )

    print("\nfirst step, mean over its pairs (policy and reference log-probs of the answers):")
    print(f"{'run':<12} {'logp chosen':>11} {'logp rejected':>13} {'ref chosen':>10} {'ref rejected':>12}")
    for name, result in ok.items():
        first = result["steps"][0]
        print(
            f"{name:<12} {first['logps_chosen']:>11.4f} {first['logps_rejected']:>13.4f} "
            f"{first['ref_logps_chosen']:>10.4f} {first['ref_logps_rejected']:>12.4f}"
        )

    print("\nper run:")
    print(
        f"{'run':<12} {'process s':>9} {'loop s':>7} {'load':>5} {'CPUs':>5} {'peak RSS MB':>11} {'final loss':>10} "
        f"{'own eval acc':>12} {'own eval loss':>13} {'eval acc':>8} {'eval margin':>11}"
    )
    for result in measured:
        if "error" in result:
            print(f"{result['run']:<12}  FAILED: {result['error']}")
            continue
        common = result.get("eval") or {}
        print(
            f"{result['run']:<12} {result['process_seconds']:>9.1f} {result['loop_seconds']:>7.1f} "
            f"{result['load_during']:>5.2f} {result['cpus_used']:>5.2f} {result['peak_rss_mb']:>11.0f} "
            f"{result['steps'][-1]['loss']:>10.4f} {result['own_eval']['reward_accuracy']:>12.3f} "
            f"{result['own_eval']['loss']:>13.4f} {fmt(common.get('reward_accuracy'), '{:.3f}'):>8} "
            f"{fmt(common.get('reward_margin'), '{:.3f}'):>11}"
        )
    print(
        "process s: wall time of the whole process (start, load, train, evaluate, save); loop s: training loop only; "
        "own eval: each trainer's evaluation at the end; eval: one function here, for both adapters; "
        f"CPUs: CPU time / wall time ({os.cpu_count()} = every core to itself)"
    )
    if comparison:
        print(
            f"speed: TRL's process time / the engine's = {comparison['speed_ratio']:.2f}x "
            f"(training loops: {comparison['loop_speed_ratio']:.2f}x)"
        )
    if targets:
        print("\ntargets:")
        for name, target in targets.items():
            verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
            value = target["value"]
            if value is None:
                shown = "-"
            elif "RSS" in name:
                shown = f"{value:+.0f} MB"
            elif name.startswith(">="):
                shown = f"{value:.2f}x"
            else:
                shown = f"{value:.3%}"
            print(f"  {name:<54} {shown:>10}  {verdict}")
    if trl:
        check = trl["token_check"]
        print(
            f"\ntokens: TRL's collator handed the model the engine's tokens for "
            f"{check['pairs'] - check['differing_pairs']} of {check['pairs']} pairs "
            f"({check['train']['pairs']} trained, in order, and {check['eval']['pairs']} held-out)"
        )
    print(
        f"load average: start {describe_load(load_start)}, end {describe_load(load_end)} on {os.cpu_count()} CPUs; "
        f"benchmark took {seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    sys.exit(main())
