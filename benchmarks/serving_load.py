"""Concurrent streamed chat through the live API, for the base and a LoRA model, beside vLLM CPU.

Starts the real stack (ASGI server, Redis, Celery workers), then for each concurrency level sends
N streamed `POST /v1/chat/completions` at once (temperature 0, a fixed set of varied prompts) and
measures, at the client: completion tokens per second over all streams together, the first
token's latency (median and p95 over every request) and the wall time of the level.

Serving paths: the shared pool (a model without a deployment) and, with --deployment, a
deployment of 1 instance and then the same deployment scaled to 2; with vLLM installed, also a
deployment of 1 instance on the vLLM backend (a vLLM server behind our API: keys, routing over Redis,
our chat format, usage). The LoRA model is a random,
non-zero adapter built with the product's own LoRA settings (r 16, all linear layers) and
registered as a fine-tuned model. When a vLLM venv exists (`make install-vllm`), vLLM's OpenAI
server serves the same folder in bf16 after the stack stops, and every row of ours gets its
ratio to vLLM at the same level, computed from this run: for the vLLM deployment that ratio is the
cost of our API in front of the same engine.

    python -m benchmarks.serving_load [--levels 1,4,8,16] [--max-tokens 96] [--repeats 1]
        [--deployment] [--backends embedded,vllm] [--skip-lora] [--vllm-python PATH] [--out var/bench/serving_load.json]
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.vllm_server import find_python, installed_version, start_vllm, stop_vllm
from llm.bundled import BUNDLED_MODEL_ID, prepare_bundled_model
from tests.live import REPO, Stack, start_stack, stop_stack

FT_HOME = Path(os.environ.get("FT_HOME", REPO / "var"))
LORA_MODEL_ID = f"ft:{BUNDLED_MODEL_ID}:bench:serving-load:r16"
LORA_NAME = "serving-load-lora"
"""The LoRA module's name on the vLLM server."""
REQUEST_TIMEOUT = 900

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List ten ideas for a rainy Sunday afternoon with children.",
    "What are the main differences between a violin and a cello?",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite email asking a neighbour to trim their hedge.",
    "Give me a recipe for a simple vegetable soup.",
    "Why do leaves change colour in autumn?",
    "Summarise the rules of chess in a few paragraphs.",
    "Write a poem about a city waking up in the morning.",
    "How does a bicycle stay upright while moving?",
    "Plan a three-day trip to the mountains for a beginner hiker.",
    "Explain what a database index is and when to use one.",
    "Tell me about the history of the printing press.",
    "What should I pack for a week at the beach?",
    "Write a dialogue between a cat and a dog arguing about the sofa.",
]


@dataclass
class Outcome:
    """One streamed request as the client saw it."""

    tokens: int = 0
    first_token_s: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Row:
    """One serving path at one concurrency level: the numbers the table and the JSON show."""

    model: str
    path: str
    streams: int
    tokens_per_s: float
    first_token_p50_s: float | None
    first_token_p95_s: float | None
    wall_s: float
    completion_tokens: int
    failed: int
    errors: list[str] = field(default_factory=list)


@dataclass
class Target:
    """Where to send a model's requests: ours through one serving path, or vLLM."""

    label: str
    path: str
    url: str
    key: str
    model: str


async def stream_once(http: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> Outcome:
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome, content_chunks, usage = Outcome(), 0, None
    started = time.perf_counter()
    try:
        async with http.stream(
            "POST",
            target.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {target.key}"},
            timeout=REQUEST_TIMEOUT,
        ) as response:
            if response.status_code != 200:
                outcome.error = (
                    f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
                )
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    outcome.error = f"in-stream error: {json.dumps(chunk['error'])[:200]}"
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("tool_calls"):
                        content_chunks += 1
                        if outcome.first_token_s is None:
                            outcome.first_token_s = time.perf_counter() - started
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    # The usage chunk counts tokens; content chunks are the fallback for a server that sends none.
    outcome.tokens = usage["completion_tokens"] if usage else content_chunks
    return outcome


async def one_round(target: Target, streams: int, max_tokens: int) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits) as http:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(stream_once(http, target, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(streams))
        )
        return list(outcomes), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(target: Target, model: str, levels: list[int], max_tokens: int, repeats: int) -> list[Row]:
    """Each level `repeats` times: median tokens/s and wall over rounds, first-token percentiles over requests."""
    asyncio.run(one_round(target, 1, 8))  # loads the model where it will serve; not measured
    rows = []
    for streams in levels:
        rates, walls, firsts, tokens, failures = [], [], [], 0, []
        for _ in range(repeats):
            outcomes, wall = asyncio.run(one_round(target, streams, max_tokens))
            done = [o for o in outcomes if o.error is None]
            round_tokens = sum(o.tokens for o in done)
            rates.append(round_tokens / wall)
            walls.append(wall)
            tokens += round_tokens
            firsts += [o.first_token_s for o in done if o.first_token_s is not None]
            failures += [o.error for o in outcomes if o.error is not None]
        row = Row(
            model=model,
            path=target.path,
            streams=streams,
            tokens_per_s=statistics.median(rates),
            first_token_p50_s=percentile(firsts, 50),
            first_token_p95_s=percentile(firsts, 95),
            wall_s=statistics.median(walls),
            completion_tokens=tokens,
            failed=len(failures),
            errors=sorted(set(failures))[:3],
        )
        print(f"  {target.label}: {format_row(row)}", flush=True)
        rows.append(row)
    return rows


def build_lora_adapter(base_dir: Path, dest: Path) -> Path:
    """A PEFT adapter with the product's default LoRA settings (r 16, alpha 32, all linear layers), B non-zero.

    Training leaves B near zero after a few steps too; random small values make the adapter's
    arithmetic real (a zero B could be skipped) while the answers stay close to the base's.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llm.train.config import TrainConfig
    from llm.train.modeling import lora_config

    config = lora_config(TrainConfig(model=str(base_dir), train_file="", out_dir=str(dest)))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    model.save_pretrained(dest)
    return dest


def register_fine_tuned_model(stack: Stack, username: str, adapter_dir: Path) -> str:
    """Register the adapter as the user's fine-tuned model, as the tests do through `manage.py shell`."""
    code = (
        "from django.contrib.auth import get_user_model; from deployments_app.models import ModelCard; "
        f"ModelCard.objects.update_or_create(model_id={LORA_MODEL_ID!r}, defaults=dict("
        f"owner=get_user_model().objects.get(username={username!r}), base_model={BUNDLED_MODEL_ID!r}, "
        f"method='lora', path={str(adapter_dir)!r}, "
        "hyperparameters={'lora_rank': 16, 'lora_alpha': 32, 'target_modules': 'all-linear'}))"
    )
    stack.manage("shell", "-c", code)
    return LORA_MODEL_ID


class DeploymentFailed(RuntimeError):
    pass


def wait_for_deployment(rest: httpx.Client, deployment_id: str, running: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = rest.get(f"/api/deployments/{deployment_id}").json()
        if body["status"] in ("failed", "cancelled"):
            raise DeploymentFailed(f"deployment {body['status']}: {body.get('error')}")
        if body["status"] == "running" and body["running_instances"] == running:
            return body
        time.sleep(1)
    raise DeploymentFailed(f"{running} instance(s) not running after {timeout:.0f} s: {body}")


def measure_deployment(
    stack, key, model, label, args, *, backend: str = "embedded", scales: tuple[int, ...] = (1, 2)
) -> tuple[list[Row], str | None]:
    """The model on a deployment of 1 instance, then scaled to 2 (by default); cancelled afterwards."""
    rows: list[Row] = []
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as rest:
        created = rest.post(
            "/api/deployments",
            json={"model": model, "instances": 1, "max_concurrent_requests": args.max_concurrent, "backend": backend},
        )
        if created.status_code != 200:
            return rows, f"POST /api/deployments answered {created.status_code}: {created.text[:300]}"
        deployment_id = created.json()["id"]
        try:
            for instances in scales:
                if instances > 1:
                    scaled = rest.patch(f"/api/deployments/{deployment_id}", json={"instances": instances})
                    if scaled.status_code != 200:
                        return rows, f"scaling to {instances} answered {scaled.status_code}: {scaled.text[:300]}"
                wait_for_deployment(rest, deployment_id, instances, timeout=600 if backend == "embedded" else 1200)
                path = f"deployment x{instances}" if backend == "embedded" else f"vLLM deployment x{instances}"
                target = Target(f"{label}, {path}", path, stack.url, key, model)
                rows += measure(target, label, args.levels, args.max_tokens, args.repeats)
        except DeploymentFailed as exc:
            return rows, str(exc)
        finally:
            rest.delete(f"/api/deployments/{deployment_id}")
    return rows, None


def run_ours(
    adapter_dir: Path | None, model_dir: Path, args, vllm_python: Path | None = None
) -> tuple[list[Row], list[str]]:
    """Our stack: the shared pool, then (--deployment) deployments on the embedded engine and, with vLLM
    installed, on the vLLM backend: one instance whose vLLM server the requests reach through our API."""
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as home:
        # The benchmark's one client stands for many users: no per-user limits on its streams.
        os.environ.update(FT_MAX_CHAT_STREAMS_PER_USER="0", FT_RATE_LIMIT_RPM="0", FT_RATE_LIMIT_TPM="0")
        if vllm_python is not None:
            os.environ.update(FT_VLLM_PYTHON=str(vllm_python), FT_VLLM_MAX_MODEL_LEN="2048")
        stack = start_stack(Path(home) / "stack", {BUNDLED_MODEL_ID: model_dir})
        try:
            key = stack.api_key("bench")
            ids = {"base": BUNDLED_MODEL_ID}
            if adapter_dir is not None:
                ids["lora"] = register_fine_tuned_model(stack, "bench", adapter_dir)
            for label, model in ids.items():
                target = Target(f"{label}, pool", "pool", stack.url, key, model)
                rows += measure(target, label, args.levels, args.max_tokens, args.repeats)
            if args.deployment:
                for label, model in ids.items():
                    if "embedded" in args.backends:
                        deployed, problem = measure_deployment(stack, key, model, label, args)
                        rows += deployed
                        if problem:
                            notes.append(f"{label} deployment: {problem}")
                            print(f"  {label} deployment stopped: {problem}", flush=True)
                    if vllm_python is not None and "vllm" in args.backends:
                        deployed, problem = measure_deployment(
                            stack, key, model, label, args, backend="vllm", scales=(1,)
                        )
                        rows += deployed
                        if problem:
                            notes.append(f"{label} vLLM deployment: {problem}")
                            print(f"  {label} vLLM deployment stopped: {problem}", flush=True)
        finally:
            stop_stack(stack)
    return rows, notes


def run_vllm(python: Path, model_dir: Path, adapter_dir: Path | None, args) -> tuple[list[Row], list[str], dict]:
    """The same load against vLLM's server: one server for the base, another with --enable-lora for the LoRA row."""
    rows: list[Row] = []
    notes: list[str] = []
    info: dict = {}
    runs: list[tuple[str, tuple[str, Path] | None]] = [("base", None)]
    if adapter_dir is not None:
        runs.append(("lora", (LORA_NAME, adapter_dir)))
    for label, lora in runs:
        log_path = FT_HOME / "bench" / f"vllm-{label}.log"
        started = time.monotonic()
        try:
            server = start_vllm(python, model_dir, BUNDLED_MODEL_ID, log_path, lora=lora)
        except RuntimeError as exc:
            notes.append(f"vLLM {label} did not start (log: {log_path}): {str(exc)[-1500:]}")
            print(f"  vLLM {label} did not start; its log: {log_path}\n{str(exc)[-1500:]}", flush=True)
            continue
        info[f"{label}_startup_s"] = round(time.monotonic() - started, 1)
        info["compute_cores"] = server.compute_cores()
        try:
            target = Target(f"{label}, vLLM", "vLLM", server.url, "unused", server.model)
            rows += measure(target, label, args.levels, args.max_tokens, args.repeats)
        finally:
            stop_vllm(server)
    return rows, notes, info


def ratios(rows: list[Row]) -> list[dict]:
    """Each of our rows over vLLM's at the same model and level: tokens/s (higher is better), first token (lower)."""
    vllm = {(r.model, r.streams): r for r in rows if r.path == "vLLM"}
    found = []
    for row in rows:
        other = vllm.get((row.model, row.streams))
        if row.path == "vLLM" or other is None:
            continue
        found.append(
            {
                "model": row.model,
                "path": row.path,
                "streams": row.streams,
                "tokens_per_s": row.tokens_per_s / other.tokens_per_s if other.tokens_per_s else None,
                "first_token_p50": divide(row.first_token_p50_s, other.first_token_p50_s),
                "first_token_p95": divide(row.first_token_p95_s, other.first_token_p95_s),
            }
        )
    return found


def divide(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_row(row: Row) -> str:
    return (
        f"{row.streams:>3} streams  {row.tokens_per_s:7.1f} tokens/s  first token p50 {seconds(row.first_token_p50_s)}"
        f" p95 {seconds(row.first_token_p95_s)}  wall {row.wall_s:.1f} s  {row.completion_tokens} tokens"
        + (f"  {row.failed} failed: {row.errors[0]}" if row.failed else "")
    )


def print_table(rows: list[Row], found_ratios: list[dict]) -> None:
    by_key = {(r["model"], r["path"], r["streams"]): r for r in found_ratios}
    header = (
        f"{'model':<5} {'path':<14} {'streams':>7} {'tokens/s':>9} {'first p50':>10} {'first p95':>10}"
        f" {'wall':>8} {'tokens':>7} {'failed':>6} {'tok/s vs vLLM':>14} {'p50 vs vLLM':>12} {'p95 vs vLLM':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = by_key.get((row.model, row.path, row.streams), {})
        print(
            f"{row.model:<5} {row.path:<14} {row.streams:>7} {row.tokens_per_s:>9.1f}"
            f" {seconds(row.first_token_p50_s):>10} {seconds(row.first_token_p95_s):>10} {row.wall_s:>6.1f} s"
            f" {row.completion_tokens:>7} {row.failed:>6} {times(ratio.get('tokens_per_s')):>14}"
            f" {times(ratio.get('first_token_p50')):>12} {times(ratio.get('first_token_p95')):>12}"
        )


def summary(rows: list[Row], found_ratios: list[dict]) -> list[str]:
    """The issue's targets, read off this run: scaling with streams, with instances, and against vLLM."""
    table = {(r.model, r.path, r.streams): r for r in rows}
    low, high = min(r.streams for r in rows), max(r.streams for r in rows)
    lines = []
    for (model, path, streams), row in table.items():
        if streams != high:
            continue
        single = table.get((model, path, low))
        if single and single.tokens_per_s and low != high:
            lines.append(
                f"{model} {path}: {high} streams give {row.tokens_per_s / single.tokens_per_s:.2f}x the tokens/s"
                f" of {low}; first token p95 {seconds(row.first_token_p95_s)}"
            )
        if path == "deployment x2" and (one := table.get((model, "deployment x1", high))) and one.tokens_per_s:
            lines.append(f"{model}: 2 instances give {row.tokens_per_s / one.tokens_per_s:.2f}x 1 instance at {high}")
    for ratio in found_ratios:
        if ratio["streams"] == high and ratio["tokens_per_s"] is not None:
            lines.append(f"{ratio['model']} {ratio['path']}: {ratio['tokens_per_s']:.2f}x vLLM's tokens/s at {high}")
    for ratio in found_ratios:  # the same engine behind our API: what the API costs, at every level
        if ratio["path"].startswith("vLLM deployment") and ratio["tokens_per_s"] is not None:
            overhead = 1 - ratio["tokens_per_s"]
            lines.append(
                f"{ratio['model']} {ratio['path']}, {ratio['streams']} streams: our API costs {overhead:.1%} of"
                f" vLLM's direct tokens/s ({'within' if overhead <= 0.10 else 'beyond'} the 10% budget)"
            )
    return lines


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive whole numbers, got {text!r}")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=parse_levels, default=[1, 4, 8, 16], help="streams at once, e.g. 1,4,16")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per level; tokens/s is their median")
    parser.add_argument("--deployment", action="store_true", help="also a deployment of 1, then 2 instances")
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="a deployment's max_concurrent_requests (default: top level)"
    )
    parser.add_argument(
        "--backends",
        type=lambda text: {part.strip() for part in text.split(",") if part.strip()},
        default={"embedded", "vllm"},
        help="with --deployment: which deployment backends to measure (default embedded,vllm; vllm needs it installed)",
    )
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--vllm-python", help="python of a venv with vLLM (default .venv-vllm/bin/python)")
    parser.add_argument("--out", type=Path, default=FT_HOME / "bench" / "serving_load.json")
    args = parser.parse_args()
    args.max_concurrent = args.max_concurrent or max(args.levels)

    model_dir = prepare_bundled_model(FT_HOME / "models" / BUNDLED_MODEL_ID)
    vllm_python = find_python(args.vllm_python)
    vllm_version = installed_version(vllm_python) if vllm_python and vllm_python.exists() else None
    lora_note = "skipped (--skip-lora)"
    print(
        f"serving_load: {BUNDLED_MODEL_ID}, streams {args.levels}, up to {args.max_tokens} new tokens,"
        f" temperature 0, {args.repeats} round(s) per level, {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        adapter_dir = None
        if not args.skip_lora:
            adapter_dir = build_lora_adapter(model_dir, Path(scratch) / "lora-r16")
            lora_note = (
                "random non-zero PEFT adapter (r 16, alpha 32, all linear layers: the product's LoRA defaults),"
                f" registered as fine-tuned model {LORA_MODEL_ID}"
            )
        print(f"LoRA model: {lora_note}", flush=True)
        rows, notes = run_ours(adapter_dir, model_dir, args, vllm_python if vllm_version else None)
        vllm_info: dict = {"python": str(vllm_python) if vllm_python else None, "version": vllm_version}
        if vllm_version is None:
            vllm_info["status"] = "absent"
            print("vLLM: not installed (make install-vllm, or --vllm-python PATH); skipped.", flush=True)
        else:
            print(f"vLLM {vllm_version} ({vllm_python}): the same load, bf16", flush=True)
            vllm_rows, vllm_notes, info = run_vllm(vllm_python, model_dir, adapter_dir, args)
            rows += vllm_rows
            notes += vllm_notes
            vllm_info.update(info, status="ran" if vllm_rows else "failed")

    found_ratios = ratios(rows)
    print()
    print_table(rows, found_ratios)
    if vllm_info.get("compute_cores") is not None:
        print(f"(vLLM's compute threads ran on cores [{vllm_info['compute_cores']}]; it reserves the rest.)")
    lines = summary(rows, found_ratios)
    for line in lines + notes:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {
            "model": BUNDLED_MODEL_ID,
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "deployment": args.deployment,
            "max_concurrent_requests": args.max_concurrent,
            "cpus": os.cpu_count(),
            "prompts": PROMPTS,
        },
        "lora": lora_note,
        "vllm": vllm_info,
        "rows": [asdict(row) for row in rows],
        "ratios_to_vllm": found_ratios,
        "summary": lines,
        "notes": notes,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
