"""Measure the serving engine on a real model: first-token latency, adapter switching, tokens/s.

    python -m llm.serve.bench --model var/test-cache/SmolLM2-135M-Instruct

Runs on CPU unless --device says otherwise. Two random LoRA adapters are made in
a temporary folder. Each figure is the median of --repeats runs, and the runs of
the two things compared are interleaved, so a neighbour's load hits both alike.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .openmp import serving_environment
from .pool import ModelPool
from .schema import Completion, GenerationRequest

SHORT_PROMPT = "Hi! Who are you?"
LONG_ANSWER_PROMPT = "Write a long story about a dragon who learns to fly."
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Row = tuple[str, str, str, bool | None]
"""A table row: what was measured, its value, the target, whether it was met (None: no target)."""


def main(argv: list[str] | None = None) -> None:
    preload = serving_environment()
    if preload:  # measure the engine as the serving processes run it (see openmp.py)
        arguments = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "llm.serve.bench", *arguments], {**os.environ, **preload})
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = str(Path(args.model).resolve())
    pool = ModelPool(device=args.device, max_adapters=4)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_a, adapter_b = (make_random_adapter(model_dir, Path(tmp) / name, seed=i) for i, name in enumerate("ab"))
        print(f"model {model_dir} on {pool.device}, {torch.get_num_threads()} threads, {args.repeats} repeats")
        rows: list[Row] = []
        rows += bench_first_token(pool, model_dir, args.repeats)
        # Before any adapter: loading one wraps the base's layers for good (see adapter rows below).
        rows += bench_throughput(pool, model_dir, args.new_tokens, args.repeats)
        rows += bench_adapter_switch(pool, model_dir, adapter_a, adapter_b, args.repeats)
        rows += bench_throughput_with_adapters(pool, model_dir, adapter_a, args.new_tokens, args.repeats)
    pool.close()
    _print_table(rows)


def bench_first_token(pool: ModelPool, model_dir: str, repeats: int) -> list[Row]:
    pool.preload(model_dir)
    request = _chat(model_dir, SHORT_PROMPT, max_tokens=8)
    time_to_first_piece(pool, request)  # warm-up
    latency = statistics.median(time_to_first_piece(pool, request) for _ in range(repeats))
    return [("first token, short prompt, warm", f"{latency * 1000:.0f} ms", "<= 300 ms", latency <= 0.300)]


def bench_adapter_switch(pool: ModelPool, model_dir: str, adapter_a: str, adapter_b: str, repeats: int) -> list[Row]:
    started = time.perf_counter()
    pool.preload(model_dir, adapter_a)
    cold_load = time.perf_counter() - started
    pool.preload(model_dir, adapter_b)
    request_a = _chat(model_dir, SHORT_PROMPT, max_tokens=8, adapter_path=adapter_a)
    request_b = _chat(model_dir, SHORT_PROMPT, max_tokens=8, adapter_path=adapter_b)
    time_to_first_piece(pool, request_a)
    same, switched = [], []
    for _ in range(repeats):
        same.append(time_to_first_piece(pool, request_a))  # a after a: no switch
        switched.append(time_to_first_piece(pool, request_b))  # b after a: a switch
        switched.append(time_to_first_piece(pool, request_a))  # a after b: a switch
        same.append(time_to_first_piece(pool, request_a))
    same_ms, switched_ms = statistics.median(same) * 1000, statistics.median(switched) * 1000
    switch_cost = switched_ms - same_ms
    return [
        ("adapter first load (cold, one time)", f"{cold_load * 1000:.0f} ms", "", None),
        ("first token, same adapter again", f"{same_ms:.0f} ms", "", None),
        ("first token, after switching adapter", f"{switched_ms:.0f} ms", "", None),
        ("adapter switch cost (difference)", f"{switch_cost:+.1f} ms", "<= 50 ms", switch_cost <= 50),
        (
            "base loads after all of the above",
            str(sum(pool.stats()["base_loads"].values())),
            "1",
            sum(pool.stats()["base_loads"].values()) == 1,
        ),
    ]


def bench_throughput(pool: ModelPool, model_dir: str, new_tokens: int, repeats: int) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pool.dtype).to(pool.device).eval()
    messages = [{"role": "user", "content": LONG_ANSWER_PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(pool.device)
    request = _chat(model_dir, LONG_ANSWER_PROMPT, max_tokens=new_tokens)

    def ours() -> tuple[int, float]:
        started = time.perf_counter()
        completion = pool.generate(request)
        return completion.completion_tokens, time.perf_counter() - started

    def theirs() -> tuple[int, float]:
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
        _sync(pool.device)
        return output.shape[1] - inputs["input_ids"].shape[1], time.perf_counter() - started

    ours(), theirs()  # warm-up
    our_rates, their_rates = [], []
    for _ in range(repeats):
        tokens, seconds = ours()
        our_rates.append(tokens / seconds)
        tokens_theirs, seconds = theirs()
        their_rates.append(tokens_theirs / seconds)
    our_rate, their_rate = statistics.median(our_rates), statistics.median(their_rates)
    ratio = our_rate / their_rate
    return [
        (f"tokens/s generate_stream ({tokens} tokens, greedy)", f"{our_rate:.1f}", "", None),
        (f"tokens/s model.generate ({tokens_theirs} tokens, greedy)", f"{their_rate:.1f}", "", None),
        ("generate_stream / model.generate", f"{ratio:.2f}x", ">= 0.90x", ratio >= 0.90),
    ]


def bench_throughput_with_adapters(
    pool: ModelPool, model_dir: str, adapter: str, new_tokens: int, repeats: int
) -> list[Row]:
    rows: list[Row] = []
    for label, adapter_path in (("base only, adapters loaded", None), ("with an adapter", adapter)):
        request = _chat(model_dir, LONG_ANSWER_PROMPT, max_tokens=new_tokens, adapter_path=adapter_path)
        pool.generate(request)
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            completion = pool.generate(request)
            rates.append(completion.completion_tokens / (time.perf_counter() - started))
        rows.append((f"tokens/s generate_stream, {label}", f"{statistics.median(rates):.1f}", "", None))
    return rows


def time_to_first_piece(pool: ModelPool, request: GenerationRequest) -> float:
    """Seconds from asking until the first text piece (or the end, if there is no text)."""
    started = time.perf_counter()
    stream = pool.generate_stream(request)
    for event in stream:
        if isinstance(event, str) and event or isinstance(event, Completion):
            break
    elapsed = time.perf_counter() - started
    stream.close()
    return elapsed


def make_random_adapter(model_dir: str, dest: Path, *, seed: int, rank: int = 16) -> str:
    """Save a LoRA adapter with random weights for model_dir; return its folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, target_modules=LORA_TARGETS)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make it change the answers
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(dest)
    return str(dest)


def _chat(model_dir: str, text: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        base_path=model_dir, messages=[{"role": "user", "content": text}], temperature=0.0, **fields
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _print_table(rows: list[Row]) -> None:
    width = max(len(row[0]) for row in rows)
    print(f"\n{'measure':<{width}}  {'value':>12}  {'target':>10}  ok")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<{width}}  {value:>12}  {target:>10}  {verdict}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of a Hugging Face causal LM with a chat template")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per throughput run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is reported")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
