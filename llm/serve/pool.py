"""A pool of loaded models: each base model once, with one continuous-batching engine per base.

Thread-safe. Loading a base happens once even when several threads ask for it
together, and a process loads one model at a time (two loads at once in one
process are not safe in transformers' loader). Every request on a base joins its
engine's running batch (see engine.py); requests for different LoRA adapters of
that base share the same forward passes, each row with its own adapter (see
lora.py). Adapters that cannot be applied per row are merged into a model of
their own, which gets its own engine.
"""

import gc
import itertools
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.chat import check_messages, check_tools

from .engine import BatchEngine, Stream, percentile
from .errors import InvalidRequest, ModelLoadError, PromptTooLong, ServingError
from .hf import ServedModel, ServingTokenizer
from .kv import ATTENTION
from .lora import NotPerRow, install, read_adapter, uninstall
from .processors import MAX_TOP_LOGPROBS
from .prompt import render_prompt
from .schema import Completion, GenerationRequest

log = logging.getLogger(__name__)

MODEL_LOADING = threading.Lock()
"""One model load at a time in a process: two at once in one process crash inside transformers' loader."""
_UNLOADED = "the model was unloaded while the request was answered; send it again"


@dataclass(eq=False)
class _Adapter:
    id: int
    streams: int = 0
    """Requests using it now; an adapter in use is never evicted."""


@dataclass(eq=False)
class _LoadedBase:
    path: str
    model: ServedModel | None
    """None once unloaded."""
    tokenizer: ServingTokenizer | None
    end_token_ids: frozenset[int]
    context_length: int | None
    engine: BatchEngine
    adapters: OrderedDict[str, _Adapter] = field(default_factory=OrderedDict)
    """Adapter folder -> its id in the engine's model, least recently used first."""
    merged: dict[str, "_LoadedBase"] = field(default_factory=dict)
    """Adapter folder -> a model of its own, for adapters that cannot be applied per row."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards adapters and merged."""

    def loaded(self) -> tuple[ServedModel, ServingTokenizer]:
        """The model and tokenizer; ServingError once the base was unloaded."""
        if self.model is None or self.tokenizer is None:
            raise ServingError(_UNLOADED)
        return self.model, self.tokenizer


class ModelPool:
    """The models one process serves, loaded on first use and shared by all threads."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_adapters: int = 4,
        max_bases: int | None = None,
        max_batch: int = 16,
        kv_memory_bytes: int = 2 << 30,
        prefill_tokens: int = 256,
        queue_timeout: float = 30.0,
    ):
        """device: "auto" (CUDA when present), "cpu" or "cuda[:N]"; dtype: "auto" (bfloat16 where the
        hardware computes it fast, else float32), "float32" or "bfloat16"; max_adapters: adapters kept
        per base; max_bases: base models kept loaded (None: no limit; past it the least recently used
        idle one is unloaded); max_batch, kv_memory_bytes, prefill_tokens, queue_timeout: each engine's
        (see BatchEngine)."""
        if max_adapters < 1 or (max_bases is not None and max_bases < 1):
            raise ValueError("max_adapters and max_bases must be at least 1")
        self.max_bases = max_bases
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_adapters = max_adapters
        self.engine_settings: dict[str, Any] = {
            "max_batch": max_batch,
            "kv_memory_bytes": kv_memory_bytes,
            "prefill_tokens": prefill_tokens,
            "queue_timeout": queue_timeout,
        }
        self._lock = threading.Lock()
        self._bases: OrderedDict[str, _LoadedBase] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, threading.Lock] = {}
        self._base_loads: Counter[str] = Counter()
        self._adapter_loads: Counter[str] = Counter()
        self._adapter_evictions = 0
        self._adapter_ids = itertools.count(1)
        self.threads = torch.get_num_threads()
        """torch threads of each engine: the count set when the pool was made."""

    def open_stream(self, request: GenerationRequest) -> Stream:
        """Check the request and queue it on its base's engine; the answer arrives on the Stream.

        Bad requests raise here, before anything is queued.
        """
        check_request(request)
        base = self._base(request.base_path)
        adapter_path = _adapter_folder(request.adapter_path) if request.adapter_path else None
        prompt_ids = self._prompt_ids(base, request.messages, request.offered_tools)
        if base.context_length and len(prompt_ids) + request.max_tokens > base.context_length:
            raise PromptTooLong(
                prompt_tokens=len(prompt_ids), max_tokens=request.max_tokens, context_length=base.context_length
            )
        if adapter_path is None:
            return base.engine.submit(prompt_ids, request)
        target, adapter = self._adapter(base, adapter_path)
        if adapter is None:  # merged into a model of its own
            return target.engine.submit(prompt_ids, request)
        try:
            return base.engine.submit(
                prompt_ids, request, adapter_id=adapter.id, on_finish=lambda: self._done_with(base, adapter)
            )
        except BaseException:
            self._done_with(base, adapter)
            raise

    def generate_stream(self, request: GenerationRequest) -> Stream:
        """Check the request and return a stream of text pieces ending with one Completion.

        Bad requests raise here, before the stream starts; closing the stream early
        frees its batch row before the next forward pass.
        """
        return self.open_stream(request)

    def generate(self, request: GenerationRequest) -> Completion:
        """Return the whole answer at once."""
        for event in self.generate_stream(request):
            if isinstance(event, Completion):
                return event
        raise ServingError("the stream ended without a completion")

    def count_prompt_tokens(
        self, base_path: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        """Return how many tokens the rendered prompt takes for this base model."""
        problems = check_messages(messages) + check_tools(tools)
        if problems:
            raise InvalidRequest(problems)
        return len(self._prompt_ids(self._base(base_path), messages, tools))

    def context_length(self, base_path: str) -> int | None:
        """Return the most tokens (prompt plus completion) the base model accepts, if it says."""
        return self._base(base_path).context_length

    def preload(self, base_path: str, adapter_path: str | None = None) -> None:
        """Load a base model (and an adapter) now rather than on the first request."""
        base = self._base(base_path)
        if adapter_path:
            _, adapter = self._adapter(base, _adapter_folder(adapter_path))
            if adapter is not None:
                self._done_with(base, adapter)

    def is_busy(self, base_path: str) -> bool:
        """Tell whether a request is queued or generating on this base model."""
        with self._lock:
            base = self._bases.get(_key(base_path))
        return base is not None and _engines_busy(base)

    def stats(self) -> dict[str, Any]:
        """Return what is loaded and how often things were loaded, for monitoring and tests."""
        with self._lock:
            return {
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "bases": sorted(self._bases),
                "adapters": {path: list(base.adapters) for path, base in self._bases.items()},
                "base_loads": dict(self._base_loads),
                "adapter_loads": dict(self._adapter_loads),
                "adapter_evictions": self._adapter_evictions,
            }

    def load_stats(self) -> dict[str, Any]:
        """Load on this pool's engines, summed over its bases: requests waiting to join a batch
        (queue_depth), rows in the running batches (running), generated tokens per second over the
        last 10 s (tokens_per_second), and first-token latency over recent requests in ms
        (first_token_p50_ms, first_token_p95_ms; None before any request)."""
        queue_depth = running = 0
        tokens_per_second = 0.0
        latencies: list[float] = []
        for engine in self._engines():
            load = engine.load()
            queue_depth += load.queue_depth
            running += load.running
            tokens_per_second += load.tokens_per_second
            latencies += load.first_token_ms
        latencies.sort()
        return {
            "queue_depth": queue_depth,
            "running": running,
            "tokens_per_second": round(tokens_per_second, 2),
            "first_token_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
            "first_token_p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
        }

    def alive(self) -> bool:
        """Whether the pool can answer: its engines live in this process, so as long as it does."""
        return True

    def alive_detail(self) -> str:
        return "the embedded engine runs in this process"

    def finish_all(self, finish_reason: str) -> None:
        """End every stream of every engine now, each with a Completion of this finish_reason."""
        for engine in self._engines():
            engine.finish_all(finish_reason)

    def unload(self, base_path: str) -> bool:
        """Free a base model, its adapters and merged models; streams still on it end with an error."""
        with self._lock:
            base = self._bases.pop(_key(base_path), None)
        if base is None:
            return False
        with base.lock:
            others = list(base.merged.values())
            base.merged.clear()
            base.adapters.clear()
        for loaded in (base, *others):
            loaded.engine.close()
            loaded.model = loaded.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def close(self) -> None:
        """Unload every model."""
        for path in self.stats()["bases"]:
            self.unload(path)

    def _engines(self) -> list[BatchEngine]:
        with self._lock:
            bases = list(self._bases.values())
        engines = []
        for base in bases:
            with base.lock:
                engines += [base.engine, *(merged.engine for merged in base.merged.values())]
        return engines

    def _adapter(self, base: _LoadedBase, adapter_path: str) -> tuple[_LoadedBase, _Adapter | None]:
        """The adapter, loaded into the base's model and marked in use (release with _done_with); or, for an
        adapter that cannot be applied per row, the merged model that serves it (and None)."""
        with base.lock:
            if adapter_path in base.merged:
                return base.merged[adapter_path], None
            adapter = base.adapters.get(adapter_path)
            if adapter is not None:
                base.adapters.move_to_end(adapter_path)
                adapter.streams += 1
                return base, adapter
            model, _ = base.loaded()
            try:
                with single_threaded():
                    weights = read_adapter(adapter_path, _as_module(model))
            except NotPerRow as reason:
                log.info("adapter %s is served merged into a model of its own: %s", adapter_path, reason)
                merged = self._load_merged(base, adapter_path)
                base.merged[adapter_path] = merged
                with self._lock:
                    self._adapter_loads[adapter_path] += 1
                return merged, None
            # Not narrowed: a folder of any content can fail in json, safetensors or torch in their own types;
            # each becomes a ModelLoadError the caller can show.
            except Exception as error:
                raise _load_error(
                    "the fine-tuned model's adapter could not be loaded",
                    f"could not load the adapter at {adapter_path}: {error}",
                ) from error
            adapter = _Adapter(id=next(self._adapter_ids), streams=1)
            install(_as_module(model), adapter.id, weights)
            base.adapters[adapter_path] = adapter
            with self._lock:
                self._adapter_loads[adapter_path] += 1
            self._evict_adapters(base)
            return base, adapter

    def _done_with(self, base: _LoadedBase, adapter: _Adapter) -> None:
        with base.lock:
            adapter.streams -= 1
            self._evict_adapters(base)

    def _evict_adapters(self, base: _LoadedBase) -> None:
        """Past max_adapters, drop the least recently used adapters no request is using. Hold base.lock."""
        surplus = len(base.adapters) - self.max_adapters
        for path, adapter in list(base.adapters.items()):
            if surplus <= 0:
                break
            if adapter.streams == 0 and base.model is not None:
                del base.adapters[path]
                uninstall(_as_module(base.model), adapter.id)
                surplus -= 1
                with self._lock:
                    self._adapter_evictions += 1

    def _load_merged(self, base: _LoadedBase, adapter_path: str) -> _LoadedBase:
        from peft import PeftModel

        def load(path: str) -> Any:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()

        return self._load(base.path, load, name=f"{Path(adapter_path).name}")

    def _base(self, base_path: str) -> _LoadedBase:
        base = self._get_or_load(_key(base_path))
        self._unload_surplus(keep=base)
        return base

    def _unload_surplus(self, *, keep: _LoadedBase) -> None:
        """Past max_bases, unload the least recently used idle bases (one in use stays until it is idle)."""
        if not self.max_bases:
            return
        with self._lock:
            candidates = [(path, other) for path, other in self._bases.items() if other is not keep]
            surplus = len(self._bases) - self.max_bases
        idle = [path for path, other in candidates if not _engines_busy(other)]
        for path in idle[: max(0, surplus)]:
            self.unload(path)

    def _get_or_load(self, key: str) -> _LoadedBase:
        with self._lock:
            if key in self._bases:
                self._bases.move_to_end(key)
                return self._bases[key]
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:  # a second thread asking for the same base waits here, then finds it loaded
            with self._lock:
                if key in self._bases:
                    return self._bases[key]
            base = self._load(key, lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype))
            with self._lock:
                self._bases[key] = base
                self._base_loads[key] += 1
            return base

    def _load(self, path: str, load_model: Any, *, name: str = "") -> _LoadedBase:
        if not (Path(path) / "config.json").is_file():
            raise _load_error(
                "the model's files are missing on this server", f"no model at {path} (config.json is missing)"
            )
        try:
            with MODEL_LOADING, single_threaded():
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = load_model(path)
        # Not narrowed: as for adapters, any folder content can fail in transformers, safetensors or torch.
        except Exception as error:
            raise _load_error(
                "the model could not be loaded", f"could not load the model at {path}: {error}"
            ) from error
        model.to(self.device).eval()
        model.set_attn_implementation(ATTENTION)
        end_token_ids = end_token_ids_of(
            getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id
        )
        return _LoadedBase(
            path=path,
            model=model,
            tokenizer=tokenizer,
            end_token_ids=end_token_ids,
            context_length=getattr(model.config, "max_position_embeddings", None),
            engine=BatchEngine(
                model,
                tokenizer,
                end_token_ids=end_token_ids,
                name=f"engine-{name or Path(path).name}",
                threads=self.threads,
                **self.engine_settings,
            ),
        )

    def _prompt_ids(
        self, base: _LoadedBase, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> list[int]:
        return render_prompt(base.loaded()[1], messages, tools)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch work outside the engines (loading) on this thread alone.

    With OpenMP, each thread that runs a parallel torch operation keeps a team of
    helper threads for the rest of its life, and while another thread's team
    exists an engine thread's matrix products run markedly slower (about 1.5x
    measured here on 2 cores). Loading on one thread creates no team; each engine
    sets its own count on its own thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_module(model: ServedModel) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the served model is a {type(model).__name__}, not a torch module")
    return model


def _engines_busy(base: _LoadedBase) -> bool:
    with base.lock:
        engines = [base.engine, *(merged.engine for merged in base.merged.values())]
    return any(engine.busy() for engine in engines)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "float32", "bfloat16", or "auto": bfloat16 on CUDA and on CPUs with fast bfloat16 (AVX-512 BF16, AMX)."""
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def resolve_device(device: str = "auto") -> torch.device:
    """Turn "auto", "cpu" or "cuda[:N]" into a device, failing loudly when CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ServingError(f"device {device!r} was asked for, but CUDA is not available")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def check_request(request: GenerationRequest) -> None:
    """Refuse a request whose messages, tools or settings are wrong, naming each problem (InvalidRequest)."""
    problems = check_messages(request.messages) + check_tools(request.tools)
    if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
        problems.append("max_tokens must be a whole number of at least 1")
    if request.temperature < 0:
        problems.append("temperature must not be negative")
    if not 0 < request.top_p <= 1:
        problems.append("top_p must be greater than 0 and at most 1")
    if request.stop is not None and not (
        isinstance(request.stop, str)
        or isinstance(request.stop, list)
        and all(isinstance(s, str) for s in request.stop)
    ):
        problems.append("stop must be a string or a list of strings")
    if problems:
        raise InvalidRequest(problems)
    _check_choices(request)


def _check_choices(request: GenerationRequest) -> None:
    """The settings of penalties, logprobs and tool choice, each refused with the field it is about."""
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(request, name) <= 2:
            raise InvalidRequest([f"{name} must be between -2 and 2"], param=name)
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest([f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}"], param="top_logprobs")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequest(["top_logprobs needs logprobs set to true"], param="top_logprobs")
    for token, bias in (request.logit_bias or {}).items():
        if not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise InvalidRequest([f"logit_bias of token {token} must be a number from -100 to 100"], param="logit_bias")
    choice = request.tool_choice
    if choice in (None, "auto", "none"):
        return
    names = [tool.get("function", tool).get("name") for tool in request.tools or []]
    if not names:
        raise InvalidRequest(["tool_choice asks for a tool call, but the request offers no tools"], param="tool_choice")
    if choice == "required":
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    wanted = function.get("name") if isinstance(function, dict) else None
    if not isinstance(wanted, str):
        raise InvalidRequest(
            ['tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'],
            param="tool_choice",
        )
    if wanted not in names:
        raise InvalidRequest([f"tool_choice names {wanted!r}, which is not one of the tools"], param="tool_choice")


def _adapter_folder(adapter_path: str) -> str:
    key = _key(adapter_path)
    if not (Path(key) / "adapter_config.json").is_file():
        raise _load_error(
            "the fine-tuned model's adapter is missing on this server",
            f"no adapter at {adapter_path} (adapter_config.json is missing)",
        )
    return key


def _load_error(message: str, detail: str) -> ModelLoadError:
    """A ModelLoadError whose paths and cause go to the log, not to the caller."""
    log.error("%s", detail)
    return ModelLoadError(message, detail=detail)


def _key(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def end_token_ids_of(*declared: int | list[int] | None) -> frozenset[int]:
    """Every token that ends a turn, from what the generation config, the model config and the tokenizer
    each declare (a token id, a list of them, or nothing)."""
    found: set[int] = set()
    for value in declared:
        if isinstance(value, int):
            found.add(value)
        elif value:
            found.update(value)
    return frozenset(found)
