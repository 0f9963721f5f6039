"""Latency of the live curve: engine emits a metric -> a websocket client receives it.

Starts the real stack (the `make run` supervisord config) in a temporary FT_HOME,
runs a training job on the tiny model and has N browsers' worth of websocket
clients watch it. Each metric message carries the time the sink published it;
clients run on the same machine, so the clock is shared.

    python -m benchmarks.curve_latency [--clients 20] [--points 150]
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import openai

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID, build_tiny_model, prepare_bundled_model
from tests.live import chat_lines, login_cookies, start_stack, stop_stack

CACHE = Path(__file__).resolve().parent.parent / "var" / "test-cache"


def login_cookie_header(stack) -> str:
    return "; ".join(f"{k}={v}" for k, v in login_cookies(stack).items())


async def watch(url: str, job_id: str, cookie: str, points: int, latencies: list[float]) -> None:
    import websockets

    async with websockets.connect(
        f"ws://{url.split('://')[1]}/ws/jobs/{job_id}/", additional_headers={"Cookie": cookie, "Origin": url}
    ) as socket:
        seen = 0
        while seen < points:
            message = json.loads(await asyncio.wait_for(socket.recv(), timeout=300))
            if message.get("type") == "metric" and "emitted_at" in message:
                latencies.append((time.time() - message["emitted_at"]) * 1000)
                seen += 1


async def run_clients(url, job_id, cookie, clients, points) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(watch(url, job_id, cookie, points, latencies) for _ in range(clients)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--points", type=int, default=150, help="metric messages each client waits for")
    args = parser.parse_args()
    models = {
        TINY_MODEL_ID: build_tiny_model(CACHE / TINY_MODEL_ID),
        BUNDLED_MODEL_ID: prepare_bundled_model(CACHE / BUNDLED_MODEL_ID),
    }
    with tempfile.TemporaryDirectory() as home:
        stack = start_stack(Path(home) / "stack", models)
        try:
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("admin"), max_retries=0)
            uploaded = client.files.create(file=("bench.jsonl", chat_lines(200)), purpose="fine-tune")
            client.files.wait_for_processing(uploaded.id, poll_interval=0.5)
            cookie = login_cookie_header(stack)
            job = client.fine_tuning.jobs.create(
                model=TINY_MODEL_ID, training_file=uploaded.id, hyperparameters={"n_epochs": 3, "batch_size": 1}
            )
            latencies = asyncio.run(run_clients(stack.url, job.id, cookie, args.clients, args.points))
            client.fine_tuning.jobs.cancel(job.id)
        finally:
            stop_stack(stack)
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"live curve latency, {args.clients} clients x {args.points} points ({len(latencies)} messages):")
    print(f"  median {statistics.median(latencies):.1f} ms   p95 {p95:.1f} ms   max {latencies[-1]:.1f} ms")
    print("  targets: median <= 100 ms, p95 <= 250 ms")


if __name__ == "__main__":
    main()
