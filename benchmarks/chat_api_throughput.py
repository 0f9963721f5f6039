"""Streaming through the chat API vs transformers' generate on the same model and prompt.

Starts the real stack, then alternates: a streamed greedy answer from
POST /v1/chat/completions (SSE, measured at the client, request to [DONE]) and
`model.generate` in this process for the same number of new tokens (greedy,
prompt from the same chat template). Reports tokens per second of each and
their ratio; the target is the API costing at most 10%.

    python -m benchmarks.chat_api_throughput [--repeats 3] [--tokens 96]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID, build_tiny_model, prepare_bundled_model
from tests.live import start_stack, stop_stack

CACHE = Path(__file__).resolve().parent.parent / "var" / "test-cache"
PROMPT = "Write a long story about a dragon who learns to fly."


def api_once(url: str, key: str, max_tokens: int) -> tuple[int, float]:
    body = {
        "model": BUNDLED_MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, tokens = time.perf_counter(), 0
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


def generate_once(model, tokenizer, new_tokens: int) -> float:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    model_dir = prepare_bundled_model(CACHE / BUNDLED_MODEL_ID)
    models = {TINY_MODEL_ID: build_tiny_model(CACHE / TINY_MODEL_ID), BUNDLED_MODEL_ID: model_dir}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as home:
        stack = start_stack(Path(home) / "stack", models)
        try:
            key = stack.api_key("bench")
            api_once(stack.url, key, 8)  # loads the model into the web process's pool
            generate_once(model, tokenizer, 8)
            api_rates, direct_rates = [], []
            for _ in range(args.repeats):
                tokens, seconds = api_once(stack.url, key, args.tokens)
                api_rates.append(tokens / seconds)
                direct_rates.append(tokens / generate_once(model, tokenizer, tokens))
        finally:
            stop_stack(stack)
    api, direct = statistics.median(api_rates), statistics.median(direct_rates)
    print(f"chat API stream vs model.generate ({BUNDLED_MODEL_ID}, CPU, greedy, {args.repeats} interleaved runs):")
    print(f"  API {api:.1f} tokens/s   generate {direct:.1f} tokens/s   ratio {api / direct:.2f}x (target >= 0.90x)")


if __name__ == "__main__":
    main()
