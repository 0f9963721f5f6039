"""Serving on vLLM: one `vllm serve` process per deployment instance, fed the prompts of our own chat format.

vLLM lives in a virtual environment of its own (`make install-vllm` makes `.venv-vllm`): its builds pin
their own torch and transformers, so nothing here imports it. `VllmPool` has the surface of `ModelPool`
that a deployment instance uses (preload, generate_stream, load_stats, finish_all, close), so the instance
keeps doing everything that makes an answer ours: the request checks, the prompt rendered by `llm.chat`
(the chat format training uses, so vLLM's own copy of the template is never asked), the tool-call parsing
and the Completion with its token counts. vLLM does the batching and the forward passes, through its
OpenAI server's `/v1/completions` with the prompt given as token ids.

A LoRA model's base is served with `--enable-lora`, and its adapter is added to the running server
through vLLM's dynamic adapter loading (`/v1/load_lora_adapter`); a full fine-tune is served from its
own weights.
"""

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from llm.chat.tools import parse_tool_calls
from llm.processes import ends_with_its_parent

from .engine import percentile
from .errors import InvalidRequest, ModelLoadError, PromptTooLong, ServingError
from .hf import ServingTokenizer
from .pool import check_request, end_token_ids_of
from .prompt import render_prompt
from .schema import Completion, GenerationRequest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "embedded", "vllm")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)
"""The values vLLM accepts for --max-lora-rank."""
_READ_TIMEOUT_S = 600.0
_STOP_WAIT_S = 15.0
"""How long a stopping server gets before its group is killed: less than the serving worker's 30 s grace."""
_NOT_HERE = "is not available on the vLLM serving backend; deploy this model on the embedded backend to use it"


@dataclass(frozen=True)
class VllmSettings:
    """How an instance starts its vLLM server."""

    python: Path
    """The python of vLLM's own virtual environment."""
    log_path: Path
    """Where the server's output goes (shown on failure)."""
    tensor_parallel_size: int = 1
    """GPUs one instance spreads its model over (1 on CPU)."""
    kv_cache_gib: float = 2.0
    """On CPU, the memory vLLM keeps for its KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int | None = 4096
    """The longest prompt plus answer; None: the model's own."""
    dtype: str = "bfloat16"
    start_timeout: float = 900.0
    extra_args: tuple[str, ...] = ()
    """More `vllm serve` arguments, as an operator gives them (FT_VLLM_ARGS)."""


# --- What is installed ----------------------------------------------------------------------------


def _ask(python: Path, code: str, timeout: float = 300) -> str | None:
    """Run code under vLLM's python; its last output line, or None when it fails or is not there."""
    if not python.exists():
        return None
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout, env=_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


@functools.cache
def installed_version(python: Path) -> str | None:
    """vLLM's version in that environment, or None when it has none."""
    return _ask(python, "from vllm._version import __version__; print(__version__)")


@functools.cache
def supported_architectures(python: Path) -> frozenset[str]:
    """The model classes (config.json's `architectures`) that environment's vLLM runs; empty without vLLM."""
    answer = _ask(
        python,
        "import json; from vllm.model_executor.models import ModelRegistry; "
        "print(json.dumps(sorted(ModelRegistry.get_supported_archs())))",
    )
    return frozenset(json.loads(answer)) if answer else frozenset()


def choose_backend(setting: str, python: Path, model_dir: Path, adapter_dir: Path | None = None) -> tuple[str, str]:
    """The backend an instance of the model at model_dir (with the adapter at adapter_dir) runs on, and why:
    "embedded" or "vllm".

    setting is FT_SERVING_BACKEND: "embedded" and "vllm" are taken as they are; "auto" takes vLLM where
    it is installed, runs the model's architecture and serves its adapter (not DoRA), the embedded engine
    elsewhere.
    """
    if setting not in BACKENDS:
        raise ValueError(f"FT_SERVING_BACKEND must be one of {', '.join(BACKENDS)}, not {setting!r}")
    if setting != "auto":
        return setting, "FT_SERVING_BACKEND"
    if installed_version(python) is None:
        return "embedded", f"vLLM is not installed at {python}"
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return "embedded", "the model's config.json cannot be read"
    if not set(architectures) & supported_architectures(python):
        return "embedded", f"vLLM does not run {', '.join(architectures) or 'this architecture'}"
    if adapter_dir is not None and _adapter_config(adapter_dir).get("use_dora"):
        return "embedded", "vLLM does not serve DoRA adapters"
    return "vllm", f"vLLM {installed_version(python)} runs {architectures[0]}"


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the adapter's adapter_config.json in {adapter_dir}: {error}") from error
    return config if isinstance(config, dict) else {}


def lora_rank_limit(adapter_dir: Path) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds this adapter's rank."""
    config = _adapter_config(adapter_dir)
    ranks = [int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    wanted = max(ranks)
    for allowed in LORA_RANKS:
        if allowed >= wanted:
            return allowed
    raise ModelLoadError(f"LoRA rank {wanted} is more than vLLM serves (at most {LORA_RANKS[-1]})")


# --- The server process ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The environment for vLLM's python: nothing of this process's venv (its OpenMP preloaded for the embedded
    engine included: vLLM's venv brings its own), and no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    kept = [entry for entry in env.pop("LD_PRELOAD", "").split(":") if entry and not entry.startswith(sys.prefix)]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    """A running `vllm serve`, in a process group of its own."""

    process: "subprocess.Popen[bytes]"
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(line for line in text.splitlines() if "Attempted to load weight" not in line)[-chars:]

    def stop(self) -> None:
        """SIGTERM the group (the API server and its engine core), then SIGKILL what is left after _STOP_WAIT_S."""
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + _STOP_WAIT_S
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            self.process.poll()
            time.sleep(0.25)
        else:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


def start_server(
    settings: VllmSettings,
    model_dir: Path,
    served_name: str,
    *,
    lora_rank: int | None = None,
    lora_modules: Sequence[tuple[str, Path]] = (),
    stopping: threading.Event | None = None,
) -> VllmServer:
    """Start `vllm serve` on model_dir and wait until /health answers.

    lora_rank: enable LoRA (adapters up to that rank), loadable while running. lora_modules: adapters
    named on the command line, for servers that must have them from the start (the benchmarks).
    stopping: set by the caller to give up waiting.
    """
    port = free_port()
    command = [
        str(settings.python),
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--dtype",
        settings.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    if settings.max_model_len:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if lora_rank is not None:
        command += ["--enable-lora", "--max-lora-rank", str(lora_rank)]
        if lora_modules:
            command += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules)]
    command += list(settings.extra_args)
    env = _env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_gib:g}")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    settings.log_path.parent.mkdir(parents=True, exist_ok=True)
    with settings.log_path.open("w") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=model_dir,
            start_new_session=True,
            preexec_fn=ends_with_its_parent,  # a killed instance never leaves its vLLM server running
        )
    server = VllmServer(process, port, settings.log_path)
    deadline = time.monotonic() + settings.start_timeout
    while time.monotonic() < deadline and not (stopping and stopping.is_set()):
        if process.poll() is not None:
            server.stop()  # its engine core may outlive it
            raise ModelLoadError(f"vLLM exited with code {process.returncode} while starting:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    if stopping and stopping.is_set():
        raise ModelLoadError("stopped while vLLM was starting")
    raise ModelLoadError(f"vLLM did not answer /health within {settings.start_timeout:.0f} s:\n{server.log_tail()}")


# --- The pool -------------------------------------------------------------------------------------


@dataclass
class _Load:
    """What load_stats reports, kept as answers run."""

    running: int = 0
    token_times: deque[float] = field(default_factory=lambda: deque(maxlen=20_000))
    first_token_ms: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    lock: threading.Lock = field(default_factory=threading.Lock)


class VllmPool:
    """One model served by a vLLM server this pool starts: ModelPool's surface for a deployment instance."""

    def __init__(self, settings: VllmSettings, *, stopping: threading.Event | None = None):
        self.settings = settings
        self.stopping = stopping
        self.server: VllmServer | None = None
        self.base_path: str | None = None
        self.adapter_path: str | None = None
        self.tokenizer: ServingTokenizer | None = None
        self.end_token_ids: list[int] = []
        self.context_length: int | None = None
        # Between two pieces of one answer: long enough for a queued request's turn, short of holding a slot forever.
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, read=_READ_TIMEOUT_S))
        self._load = _Load()
        self._finish_reason: str | None = None
        """Set by finish_all: every running answer ends with it."""

    # The served names: what requests ask vLLM for.
    BASE_NAME = "base"
    ADAPTER_NAME = "adapter"

    def preload(self, base_path: str, adapter_path: str | None = None) -> None:
        """Start the server on the base (LoRA enabled when there is an adapter) and load the adapter into it."""
        if self.server is not None:
            raise ServingError("this vLLM pool already serves a model")
        base, adapter = Path(base_path), Path(adapter_path) if adapter_path else None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base)
            config = AutoConfig.from_pretrained(base)
        except Exception as error:  # any folder content can fail in transformers in its own types
            raise ModelLoadError(f"could not read the model at {base}: {error}") from error
        self.end_token_ids = _end_token_ids(base, config, self.tokenizer)
        # vLLM refuses a --max-model-len past the model's own length: the shorter of the two.
        # A model that does not say (no max_position_embeddings): vLLM reads its length itself.
        declared = getattr(config, "max_position_embeddings", None)
        self.context_length = min(self.settings.max_model_len or declared, declared) if declared else None
        settings = dataclasses.replace(self.settings, max_model_len=self.context_length)
        rank = lora_rank_limit(adapter) if adapter else None
        self.server = start_server(settings, base, self.BASE_NAME, lora_rank=rank, stopping=self.stopping)
        self.base_path, self.adapter_path = base_path, adapter_path
        if adapter:
            answer = self.http.post(
                self.server.url + "/v1/load_lora_adapter",
                json={"lora_name": self.ADAPTER_NAME, "lora_path": str(adapter)},
            )
            if answer.status_code != 200:
                self.close()
                raise ModelLoadError(f"vLLM refused the adapter at {adapter}: {answer.text[:2000]}")

    def generate_stream(self, request: GenerationRequest) -> Iterator[str | Completion]:
        """Check the request and return a stream of text pieces ending with one Completion.

        Bad requests raise here, before the stream starts; closing the stream early ends the HTTP
        request, and vLLM drops the answer.
        """
        check_request(request)
        _refuse_what_vllm_is_not_given(request)
        if self.server is None or self.tokenizer is None:
            raise ServingError("the vLLM server is not running")
        if request.base_path != self.base_path or request.adapter_path != self.adapter_path:
            raise ServingError("this instance serves another model")
        prompt = render_prompt(self.tokenizer, request.messages, request.offered_tools)
        if self.context_length and len(prompt) + request.max_tokens > self.context_length:
            raise PromptTooLong(
                prompt_tokens=len(prompt), max_tokens=request.max_tokens, context_length=self.context_length
            )
        return self._stream(request, prompt)

    def _stream(self, request: GenerationRequest, prompt: list[int]) -> Iterator[str | Completion]:
        assert self.server is not None
        body: dict[str, Any] = {
            "model": self.ADAPTER_NAME if self.adapter_path else self.BASE_NAME,
            "prompt": prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature if request.do_sample else 0.0,
            "top_p": request.top_p,
            "stop": request.stop_strings,
            "stop_token_ids": self.end_token_ids,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "stream": True,
            # Usage in every chunk: an answer ended early (cancelled) still counts the tokens it took.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "skip_special_tokens": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logit_bias:
            body["logit_bias"] = request.logit_bias
        # Tool calls are parsed from the whole answer, so with tools offered the text comes at the end.
        hold = bool(request.offered_tools)
        text: list[str] = []
        finish_reason, usage = "stop", {"prompt_tokens": len(prompt), "completion_tokens": 0}
        started, first = time.monotonic(), True
        with self._load.lock:
            self._load.running += 1
        try:
            with self.http.stream("POST", self.server.url + "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    raise _refusal(answer.status_code, answer.read().decode(errors="replace"))
                for chunk in _events(answer.iter_lines()):
                    if "error" in chunk or chunk.get("object") == "error":  # vLLM failed midway
                        problem = chunk.get("error", chunk)
                        detail = problem.get("message", problem) if isinstance(problem, dict) else problem
                        raise ServingError(f"the vLLM server failed while answering: {detail}")
                    if self._finish_reason is not None:
                        finish_reason = self._finish_reason
                        break
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text") or ""
                        finish_reason = choice.get("finish_reason") or finish_reason
                        if piece:
                            self._count_token(started if first else None)
                            first = False
                            text.append(piece)
                            if not hold:
                                yield piece
        except httpx.HTTPError as error:
            raise ServingError(f"the vLLM server failed while answering: {error}") from error
        finally:
            with self._load.lock:
                self._load.running -= 1
        content, calls = parse_tool_calls("".join(text)) if hold else ("".join(text), [])
        if hold and content:
            yield content
        yield Completion(
            content=content,
            finish_reason="tool_calls" if calls else finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or len(prompt)),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            tool_calls=calls,
        )

    def _count_token(self, started: float | None) -> None:
        now = time.monotonic()
        with self._load.lock:
            self._load.token_times.append(now)
            if started is not None:
                self._load.first_token_ms.append((now - started) * 1000)

    def load_stats(self) -> dict[str, Any]:
        """As ModelPool.load_stats: vLLM queues inside itself, so every open answer counts as running."""
        now = time.monotonic()
        with self._load.lock:
            recent = sum(1 for moment in self._load.token_times if now - moment <= 10)
            latencies = sorted(self._load.first_token_ms)
            running = self._load.running
        return {
            "queue_depth": 0,
            "running": running,
            "tokens_per_second": round(recent / 10, 2),
            "first_token_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
            "first_token_p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
        }

    def alive(self) -> bool:
        """Whether the vLLM server still runs (once started)."""
        return self.server is None or self.server.process.poll() is None

    def alive_detail(self) -> str:
        if self.server is None or self.server.process.poll() is None:
            return "the vLLM server runs"
        return f"the vLLM server exited with code {self.server.process.returncode}:\n{self.server.log_tail(2000)}"

    def finish_all(self, finish_reason: str) -> None:
        """End every running answer at its next piece, each with a Completion of this finish_reason."""
        self._finish_reason = finish_reason

    def close(self) -> None:
        """Stop the server."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        self.http.close()


def _refuse_what_vllm_is_not_given(request: GenerationRequest) -> None:
    """The parameters this backend does not pass on, each a 400 naming it rather than an answer without it."""
    if request.logprobs:
        raise InvalidRequest([f"logprobs {_NOT_HERE}"], param="logprobs")
    if request.response_format and request.response_format.get("type") not in (None, "text"):
        raise InvalidRequest(
            [f"response_format {request.response_format.get('type')} {_NOT_HERE}"], param="response_format"
        )
    if request.tool_choice not in (None, "auto", "none"):
        raise InvalidRequest([f"tool_choice {json.dumps(request.tool_choice)} {_NOT_HERE}"], param="tool_choice")
    if request.tools and not request.parallel_tool_calls:
        raise InvalidRequest([f"parallel_tool_calls false {_NOT_HERE}"], param="parallel_tool_calls")


def _refusal(status: int, text: str) -> ServingError:
    """vLLM's answer to a request it refused, in our terms."""
    try:
        message = json.loads(text).get("error", {}).get("message") or text
    except (ValueError, AttributeError):
        message = text
    if status == 400:
        return InvalidRequest([f"vLLM refused the request: {message[:500]}"])
    return ServingError(f"the vLLM server answered {status}: {message[:500]}")


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _end_token_ids(path: Path, config: Any, tokenizer: ServingTokenizer) -> list[int]:
    """Every token that ends a turn, counted as the embedded pool counts them."""
    try:
        generation = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        generation = None
    return sorted(end_token_ids_of(generation, getattr(config, "eos_token_id", None), tokenizer.eos_token_id))
