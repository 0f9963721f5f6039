"""Many users at once: streamed chat, job-page websockets and /healthz while a heavy batch compare runs.

Starts the real stack (supervisord's web, Celery workers, beat, embedded Redis) in a temporary
FT_HOME. Setup, as two users:

- `admin` uploads a dataset of long answers (about 3,000 words each) and fine-tunes the tiny model
  on it: that model's data is what the batch compare reads its prompts and references from. A second
  admin job (small examples, many epochs) keeps training through the run: the job whose page the
  websocket viewers watch, signed in as admin.
- `load-chat` deploys the chat model (the bundled SmolLM2-135M-Instruct, or the tiny model with
  --tiny) with one instance; every chat client sends its requests with this user's key, so they
  go to the deployment. Per-user limits (open chat streams, requests and tokens per minute) are
  turned off, as in serving_load: here one key stands for many people.

Then, for --duration seconds (after --idle seconds with only the /healthz poller):
--clients streamed chat clients in a loop, --viewers websocket viewers of the running job's page,
a /healthz poller every 100 ms in a process of its own (so the clients' own event loop does not
delay it), and, after the first --baseline seconds, one playground batch compare with --batch-n
prompts, long references and long answers from two models. /healthz is reported per phase: idle,
load without the batch compare, load with it (target: p95 <= 200 ms), and the drain after --duration
(the requests under way finishing, the batch compare still running).

Exits 1 when any response was a 5xx.

    python -m benchmarks.load_test [--duration 60] [--clients 50] [--viewers 20] [--tiny]
        [--out var/bench/load_test.json]
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai

from benchmarks.serving_load import FT_HOME, PROMPTS, DeploymentFailed, percentile, wait_for_deployment
from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID, build_tiny_model, prepare_bundled_model
from tests.live import Stack, chat_lines, login_cookies, start_stack, stop_stack

CHAT_USER = "load-chat"
HEALTHZ_TARGET_P95_MS = 200.0
REFERENCE_WORDS = 3000
"""Longer than the 2,000 words ROUGE-L reads, so every row scores at the cap."""
_WORDS = (
    "river stone lantern harbour meadow engine window letter garden signal copper winter valley "
    "market bridge candle orchard thunder paper violin silver forest ladder compass island"
).split()


@dataclass
class ChatResult:
    phase: str
    status: int | None
    first_token_s: float | None
    seconds: float
    error: str | None


@dataclass
class ViewerStats:
    connections: int = 0
    messages: int = 0
    metric_latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    five_xx: int = 0


@dataclass
class BatchResult:
    status: int | None = None
    rows: int = 0
    failed_answers: int = 0
    finished: bool = False
    run_statuses: list = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class Clock:
    """The run's phase boundaries, in wall-clock seconds (the /healthz poller's process shares the clock)."""

    def __init__(self) -> None:
        self.load_start = self.batch_start = self.batch_end = self.load_end = float("inf")

    def phase(self, at: float) -> str:
        if at < self.load_start:
            return "idle"
        if at >= self.load_end:
            return "drain"
        if at < self.batch_start:
            return "load"
        return "load+batch" if at < self.batch_end else "load, after batch"


# --- setup


def long_answer_lines(n: int, seed: int = 0) -> bytes:
    """n chat examples whose answers are REFERENCE_WORDS words long: the batch compare's references."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        answer = " ".join(rng.choices(_WORDS, k=REFERENCE_WORDS))
        messages = [
            {"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (case {i})"},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def upload(client: openai.OpenAI, name: str, content: bytes) -> str:
    uploaded = client.files.create(file=(name, content), purpose="fine-tune")
    processed = client.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=600)
    if processed.status != "processed":
        raise RuntimeError(f"{name} was not processed: {processed.status} {processed.status_details}")
    return uploaded.id


def wait_for_job(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job.status}: {job.error}")
        time.sleep(1)
    raise RuntimeError(f"job {job_id} not {statuses} after {timeout:.0f} s")


def prepare_jobs(stack: Stack, batch_n: int) -> tuple[str, str]:
    """(the fine-tuned model the batch compare reads its examples from, the id of a job still training)."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("admin"), max_retries=0)
    long_file = upload(client, "long-answers.jsonl", long_answer_lines(max(batch_n, 8)))
    source = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=long_file,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "max_seq_len": 256},
    )
    fine_tuned = wait_for_job(client, source.id, ("succeeded",)).fine_tuned_model
    print(f"  batch-compare source: {fine_tuned} (job {source.id})", flush=True)
    small_file = upload(client, "small.jsonl", chat_lines(200))
    watched = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=small_file, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    wait_for_job(client, watched.id, ("running",))
    print(f"  watched job: {watched.id} (running)", flush=True)
    return fine_tuned, watched.id


def deploy_chat_model(stack: Stack, model: str, slots: int) -> str:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.api_key(CHAT_USER)}"}) as rest:
        created = rest.post(
            "/api/deployments", json={"model": model, "instances": 1, "max_concurrent_requests": slots}, timeout=60
        )
        if created.status_code != 200:
            raise DeploymentFailed(f"POST /api/deployments answered {created.status_code}: {created.text[:300]}")
        deployment_id = created.json()["id"]
        wait_for_deployment(rest, deployment_id, 1)
    print(f"  deployment {deployment_id} of {model} for {CHAT_USER}: 1 instance running", flush=True)
    return deployment_id


def warm_up(url: str, key: str, model: str) -> None:
    """One short answer, so the model is loaded before anything is measured."""
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    )
    response.raise_for_status()


# --- the load


def healthz_poller(url: str, interval: float, ready, stop, out_path: str) -> None:
    """Runs in its own process: GET /healthz every `interval` seconds until stop is set; samples to out_path."""
    samples = []
    with httpx.Client(timeout=10) as http:
        ready.set()
        next_at = time.time()
        while not stop.is_set():
            started = time.time()
            status, error = None, None
            try:
                response = http.get(url + "/healthz")
                status = response.status_code
                if status != 200:
                    error = f"HTTP {status}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            samples.append({"at": started, "ms": (time.time() - started) * 1000, "status": status, "error": error})
            next_at += interval
            time.sleep(max(0.0, next_at - time.time()))
    Path(out_path).write_text(json.dumps(samples))


IN_STREAM_ERROR = "in-stream error"


async def chat_once(http: httpx.AsyncClient, url: str, key: str, model: str, prompt: str, args, clock) -> ChatResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "stream": True,
    }
    phase, started = clock.phase(time.time()), time.perf_counter()
    status, first, error = None, None, None
    try:
        async with http.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            status = response.status_code
            if status != 200:
                text = (await response.aread())[:200].decode(errors="replace")
                return ChatResult(phase, status, None, time.perf_counter() - started, f"HTTP {status}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    error = f"{IN_STREAM_ERROR}: {json.dumps(chunk['error'])[:200]}"
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") and first is None:
                        first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return ChatResult(phase, status, first, time.perf_counter() - started, error)


async def chat_client(index: int, url: str, key: str, model: str, args, clock, results: list[ChatResult]) -> None:
    """Send a streamed chat request, read it to the end, repeat until the run's end."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as http:
        n = index
        while time.time() < clock.load_end:
            results.append(await chat_once(http, url, key, model, PROMPTS[n % len(PROMPTS)], args, clock))
            n += 1


async def viewer(url: str, job_id: str, cookie: str, stats: ViewerStats, clock: Clock) -> None:
    """Watch the job's page websocket like the browser does; reconnect after an error until the run's end."""
    import websockets

    address = f"ws://{url.split('://')[1]}/ws/jobs/{job_id}/"
    while time.time() < clock.load_end:
        try:
            async with websockets.connect(
                address, additional_headers={"Cookie": cookie, "Origin": url}, open_timeout=30
            ) as socket:
                stats.connections += 1
                # The page asks for what it missed between rendering and joining the group.
                await socket.send(json.dumps({"type": "sync", "after_step": 0}))
                async for raw in socket:
                    stats.messages += 1
                    message = json.loads(raw)
                    if message.get("type") == "metric" and "emitted_at" in message:
                        stats.metric_latencies_ms.append((time.time() - message["emitted_at"]) * 1000)
            stats.errors.append("closed by the server")
        except websockets.InvalidStatus as exc:
            code = exc.response.status_code
            stats.five_xx += int(code >= 500)
            stats.errors.append(f"handshake HTTP {code}")
        except websockets.ConnectionClosed as exc:
            stats.errors.append(f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}")
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1)


async def batch_compare(url: str, key: str, body: dict, result: BatchResult, clock: Clock) -> None:
    """One playground batch compare: an evaluation run per model on the evaluations worker, polled until done.

    The web process only creates the runs; `rows` counts the answers written, all models together.
    """
    started = time.perf_counter()
    clock.batch_start = time.time()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/playground/batch/", json=body, headers=headers)
            result.status = response.status_code
            if response.status_code != 201:
                result.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return
            runs_url = f"{url}/v1/evals/{response.json()['id']}/runs"
            while True:
                listed = await http.get(runs_url, headers=headers, params={"limit": 100})
                result.status = listed.status_code
                if listed.status_code != 200:
                    result.error = f"HTTP {listed.status_code}: {listed.text[:300]}"
                    return
                runs = listed.json()["data"]
                result.rows = sum(run["progress"]["done"] for run in runs)  # answers, all models together
                result.run_statuses = [run["status"] for run in runs]
                result.failed_answers = sum(run["result_counts"]["errored"] for run in runs)
                if runs and all(run["status"] not in ("queued", "in_progress") for run in runs):
                    result.finished = True
                    return
                await asyncio.sleep(1)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.perf_counter() - started
        clock.batch_end = time.time()


async def run_load(stack: Stack, chat_model: str, batch_body: dict, job_id: str, args, clock: Clock):
    chat_key, admin_key = stack.api_key(CHAT_USER), stack.api_key("admin")
    cookie = "; ".join(f"{k}={v}" for k, v in login_cookies(stack).items())
    chats: list[ChatResult] = []
    viewers = ViewerStats()
    batch = BatchResult()
    clock.load_start = time.time()
    clock.load_end = clock.load_start + args.duration
    tasks = [
        asyncio.create_task(chat_client(i, stack.url, chat_key, chat_model, args, clock, chats))
        for i in range(args.clients)
    ]
    watchers = [asyncio.create_task(viewer(stack.url, job_id, cookie, viewers, clock)) for _ in range(args.viewers)]
    await asyncio.sleep(args.baseline)
    compare = asyncio.create_task(batch_compare(stack.url, admin_key, batch_body, batch, clock))
    await asyncio.sleep(max(0.0, clock.load_end - time.time()))
    for task in watchers:
        task.cancel()
    # Requests under way at the end finish (they are measured); one past the drain time is cut off.
    done, pending = await asyncio.wait(tasks, timeout=args.drain)
    for task in [*pending, compare]:
        task.cancel()
    await asyncio.gather(*watchers, *pending, compare, return_exceptions=True)
    return chats, viewers, batch, len(pending)


# --- the report


def ms_summary(values_ms: list[float]) -> dict:
    return {
        "n": len(values_ms),
        "p50_ms": round_or_none(percentile(values_ms, 50)),
        "p95_ms": round_or_none(percentile(values_ms, 95)),
        "max_ms": round_or_none(max(values_ms) if values_ms else None),
    }


def round_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def chat_summary(results: list[ChatResult]) -> dict:
    ok = [r for r in results if r.error is None and r.status == 200]
    return {
        "requests": len(results),
        "ok": len(ok),
        "statuses": dict(Counter(str(r.status) for r in results)),
        "errors_by_kind": dict(Counter(error_kind(r.error) for r in results if r.error)),
        "error_examples": sorted({r.error for r in results if r.error})[:5],
        "first_token": ms_summary([r.first_token_s * 1000 for r in ok if r.first_token_s is not None]),
        "total": ms_summary([r.seconds * 1000 for r in ok]),
    }


def error_kind(error: str) -> str:
    """An error's kind without its particulars: "HTTP 429", "ReadTimeout", "in-stream error"."""
    return error.split(":")[0]


def healthz_summary(samples: list[dict], clock: Clock) -> dict:
    phases: dict[str, dict] = {}
    for name in ("idle", "load", "load+batch", "load, after batch", "drain"):
        mine = [s for s in samples if clock.phase(s["at"]) == name]
        if not mine:
            continue
        phases[name] = {
            **ms_summary([s["ms"] for s in mine]),
            "errors": dict(Counter(error_kind(s["error"]) for s in mine if s["error"])),
            "error_examples": sorted({s["error"] for s in mine if s["error"]})[:5],
        }
    return phases


def print_report(report: dict) -> None:
    chat, view, health, batch = report["chat"], report["viewers"], report["healthz"], report["batch_compare"]
    print()
    print(
        f"chat: {chat['requests']} requests, {chat['ok']} ok, statuses {chat['statuses']},"
        f" errors {chat['errors_by_kind'] or 'none'}"
    )
    for example in chat["error_examples"]:
        print(f"  e.g. {example}")
    for name in ("first_token", "total"):
        figures = chat[name]
        print(
            f"  {name.replace('_', ' ')}: p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms"
            f"  max {figures['max_ms']} ms  (n {figures['n']})"
        )
    for phase, figures in report["chat_by_phase"].items():
        print(
            f"  started during {phase}: {figures['requests']} requests, first token p95"
            f" {figures['first_token']['p95_ms']} ms, total p95 {figures['total']['p95_ms']} ms"
        )
    print(
        f"websocket viewers: {view['viewers']} viewers, {view['connections']} connections, {view['messages']} messages,"
        f" errors {view['errors_by_kind'] or 'none'}; live metric latency p50 {view['metric_latency']['p50_ms']} ms"
        f" p95 {view['metric_latency']['p95_ms']} ms (n {view['metric_latency']['n']})"
    )
    print(
        f"batch compare: HTTP {batch['status']}, runs {batch['run_statuses']},"
        f" {batch['rows']} of {batch['requested_rows']} answers in"
        f" {batch['seconds']:.1f} s, finished {batch['finished']}, failed answers {batch['failed_answers']},"
        f" error {batch['error']}"
    )
    print("/healthz:")
    for phase, figures in health.items():
        print(
            f"  {phase:<18} n {figures['n']:>4}  p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms"
            f"  max {figures['max_ms']} ms  errors {figures['errors'] or 'none'}"
        )
    target = report["target"]
    print(
        f"target /healthz p95 during the batch compare <= {HEALTHZ_TARGET_P95_MS:.0f} ms:"
        f" {target['healthz_p95_ms_during_batch']} ms -> {'met' if target['met'] else 'NOT met'}"
    )
    print(f"5xx: {report['five_xx']}")


def build_report(args, settings: dict, chats, viewers: ViewerStats, batch: BatchResult, samples, clock, cut) -> dict:
    phases = sorted({r.phase for r in chats})
    healthz = healthz_summary(samples, clock)
    during = healthz.get("load+batch", {}).get("p95_ms")
    five_xx = {
        # An error after the 200 status line travels in the stream; it stands for a 500 (chat.protocol.error_event).
        "chat": sum(1 for r in chats if (r.status or 0) >= 500 or (r.error or "").startswith(IN_STREAM_ERROR)),
        "websocket_handshakes": viewers.five_xx,
        "healthz": sum(1 for s in samples if s["status"] is not None and s["status"] >= 500),
        "batch_compare": int(batch.status is not None and batch.status >= 500),
    }
    five_xx["total"] = sum(five_xx.values())
    return {
        "settings": settings,
        "chat": {**chat_summary(chats), "cut_off_at_the_end": cut},
        "chat_by_phase": {phase: chat_summary([r for r in chats if r.phase == phase]) for phase in phases},
        "viewers": {
            "viewers": args.viewers,
            "connections": viewers.connections,
            "messages": viewers.messages,
            "errors_by_kind": dict(Counter(viewers.errors)),
            "metric_latency": ms_summary(viewers.metric_latencies_ms),
        },
        "batch_compare": {**asdict(batch), "requested_rows": args.batch_n * 2},  # two models
        "healthz": healthz,
        "target": {
            "healthz_p95_ms_during_batch": during,
            "limit_ms": HEALTHZ_TARGET_P95_MS,
            "met": during is not None and during <= HEALTHZ_TARGET_P95_MS,
        },
        "five_xx": five_xx,
    }


def run(args) -> dict:
    models = {
        TINY_MODEL_ID: build_tiny_model(FT_HOME / "models" / TINY_MODEL_ID),
        BUNDLED_MODEL_ID: prepare_bundled_model(FT_HOME / "models" / BUNDLED_MODEL_ID),
    }
    chat_model = TINY_MODEL_ID if args.tiny else BUNDLED_MODEL_ID
    clock = Clock()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as home:
        # One key stands for the many people behind the chat clients: no per-user limits on it.
        os.environ.update(FT_MAX_CHAT_STREAMS_PER_USER="0", FT_RATE_LIMIT_RPM="0", FT_RATE_LIMIT_TPM="0")
        print("setup: starting the stack", flush=True)
        stack = start_stack(Path(home) / "stack", models)
        try:
            source, job_id = prepare_jobs(stack, args.batch_n)
            deploy_chat_model(stack, chat_model, min(64, args.clients))
            warm_up(stack.url, stack.api_key(CHAT_USER), chat_model)
            batch_models = [TINY_MODEL_ID, source]
            for model in batch_models:
                warm_up(stack.url, stack.api_key("admin"), model)
            batch_body = {
                "models": batch_models,
                "source": source,
                "n": args.batch_n,
                "max_tokens": args.batch_max_tokens,
                "temperature": 1.0,
                "seed": 1,
            }
            samples_path = Path(home) / "healthz.json"
            ready, stop = spawn.Event(), spawn.Event()
            poller = spawn.Process(
                target=healthz_poller, args=(stack.url, 0.1, ready, stop, str(samples_path)), daemon=True
            )
            poller.start()
            try:
                ready.wait(timeout=120)
                print(f"idle: /healthz alone for {args.idle} s", flush=True)
                time.sleep(args.idle)
                print(
                    f"load: {args.clients} chat clients, {args.viewers} viewers for {args.duration} s;"
                    f" the batch compare starts after {args.baseline} s",
                    flush=True,
                )
                chats, viewers, batch, cut = asyncio.run(run_load(stack, chat_model, batch_body, job_id, args, clock))
            finally:
                stop.set()
                poller.join(timeout=30)
            samples = json.loads(samples_path.read_text())
            openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("admin")).fine_tuning.jobs.cancel(job_id)
        finally:
            stop_stack(stack)
    settings = {
        "chat_model": chat_model,
        "chat_path": f"deployment of 1 instance owned by {CHAT_USER}",
        "per_user_limits": "off (FT_MAX_CHAT_STREAMS_PER_USER=0, FT_RATE_LIMIT_RPM=0, FT_RATE_LIMIT_TPM=0)",
        "duration_s": args.duration,
        "idle_s": args.idle,
        "baseline_s": args.baseline,
        "clients": args.clients,
        "viewers": args.viewers,
        "max_tokens": args.max_tokens,
        "batch": {**batch_body, "reference_words": REFERENCE_WORDS},
        "cpus": os.cpu_count(),
    }
    return build_report(args, settings, chats, viewers, batch, samples, clock, cut)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--clients", type=int, default=50, help="streamed chat clients")
    parser.add_argument("--viewers", type=int, default=20, help="websocket viewers of a training job's page")
    parser.add_argument("--baseline", type=float, default=None, help="seconds before the batch compare starts")
    parser.add_argument("--idle", type=float, default=5, help="seconds of /healthz alone before the load")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per chat answer")
    parser.add_argument("--batch-n", type=int, default=50, help="batch compare prompts (1 to 50)")
    parser.add_argument("--batch-max-tokens", type=int, default=256, help="new tokens per batch compare answer")
    parser.add_argument("--request-timeout", type=float, default=180, help="a chat request silent this long fails")
    parser.add_argument("--drain", type=float, default=120, help="seconds requests under way at the end may take")
    parser.add_argument("--tiny", action="store_true", help="chat with the tiny random model (a quick run)")
    parser.add_argument("--out", type=Path, default=FT_HOME / "bench" / "load_test.json")
    args = parser.parse_args()
    if args.baseline is None:
        args.baseline = args.duration / 3
    if not 0 <= args.baseline < args.duration:
        parser.error(f"--baseline must be from 0 to under --duration ({args.duration} s), got {args.baseline}")
    print(
        f"load_test: {args.clients} chat clients, {args.viewers} viewers, {args.duration:.0f} s, {os.cpu_count()} CPUs",
        flush=True,
    )
    report = run(args)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")
    raise SystemExit(1 if report["five_xx"]["total"] else 0)


if __name__ == "__main__":
    main()
