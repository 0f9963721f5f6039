"""A pool of loaded models: each base model once, its LoRA adapters hot-swapped per request.

Thread-safe. Loading a base happens once even when several threads ask for it
together. Which adapter is active is state of the shared model, so each forward
pass holds its base's lock, with that stream's adapter active. The lock is fair
(first come, first served) and taken per token, so streams on one base take turns
token by token: a playground's base, fine-tuned and checkpoint panes, or several
API callers, all stream at once instead of one after another.
"""

import gc
import itertools
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.chat import check_messages, check_tools

from .errors import InvalidRequest, ModelLoadError, PromptTooLong, ServingError
from .generate import stream_completion
from .hf import AdapterModel, ServedModel, ServingTokenizer
from .prompt import render_prompt
from .schema import Completion, GenerationRequest, StreamEvent

log = logging.getLogger(__name__)


class FairLock:
    """A lock granted in the order it was asked for.

    A plain Lock released and taken again at once in a loop is usually won by the
    same thread again, so one stream would starve the others between its tokens.
    """

    def __init__(self) -> None:
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    def __enter__(self) -> Self:
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._now_serving == ticket)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._turns:
            self._now_serving += 1
            self._turns.notify_all()

    def locked(self) -> bool:
        with self._turns:
            return self._now_serving != self._next_ticket


@dataclass(eq=False)
class _LoadedBase:
    path: str
    model: ServedModel | None
    """None once unloaded; loading the first adapter wraps it in a peft PeftModel."""
    tokenizer: ServingTokenizer | None
    """None once unloaded."""
    end_token_ids: frozenset[int]
    context_length: int | None
    lock: FairLock = field(default_factory=FairLock)
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """Adapter path -> peft adapter name, least recently used first."""
    unloaded: bool = False
    streams: int = 0
    """Streams that have started and not ended on this base."""
    active: str | None = None
    """What the model runs as now: an adapter's peft name, ADAPTERS_OFF, or None when unknown (after a load)."""

    def loaded(self) -> tuple[ServedModel, ServingTokenizer]:
        """The model and tokenizer; ServingError once the base was unloaded."""
        if self.model is None or self.tokenizer is None:
            raise ServingError(_UNLOADED)
        return self.model, self.tokenizer

    def adapter_model(self) -> AdapterModel:
        """The model once an adapter is loaded into it: a peft PeftModel."""
        model, _ = self.loaded()
        if not isinstance(model, PeftModel):
            raise TypeError(f"{self.path} has adapters but its model is a {type(model).__name__}, not a PeftModel")
        adapter_model: AdapterModel = model  # peft is untyped here: say what we use of it
        return adapter_model


ADAPTERS_OFF = "<base>"
_UNLOADED = "the model was unloaded while the request was answered; send it again"


class ModelPool:
    """The models one process serves, loaded on first use and shared by all threads."""

    def __init__(self, *, device: str = "auto", max_adapters: int = 4, max_bases: int | None = None):
        """device: "auto" (CUDA when present), "cpu" or "cuda[:N]"; max_adapters: adapters kept per base;
        max_bases: base models kept loaded (None: no limit); past it the least recently used idle one is unloaded."""
        if max_adapters < 1 or (max_bases is not None and max_bases < 1):
            raise ValueError("max_adapters and max_bases must be at least 1")
        self.max_bases = max_bases
        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.max_adapters = max_adapters
        self._lock = threading.Lock()
        self._bases: OrderedDict[str, _LoadedBase] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, threading.Lock] = {}
        self._base_loads: Counter[str] = Counter()
        self._adapter_loads: Counter[str] = Counter()
        self._adapter_evictions = 0
        self._adapter_names = itertools.count(1)

    def generate_stream(self, request: GenerationRequest) -> Generator[StreamEvent, None, None]:
        """Check the request and return a stream of text pieces ending with one Completion.

        Bad requests raise here, before the stream starts. Generation starts when the
        first item is asked for; closing the stream early stops it.
        """
        _check_request(request)
        base = self._base(request.base_path)
        adapter_path = _adapter_folder(request.adapter_path) if request.adapter_path else None
        prompt_ids = self._prompt_ids(base, request.messages, request.tools)
        if base.context_length and len(prompt_ids) + request.max_tokens > base.context_length:
            raise PromptTooLong(
                prompt_tokens=len(prompt_ids), max_tokens=request.max_tokens, context_length=base.context_length
            )
        return self._stream(base, adapter_path, prompt_ids, request)

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
            with base.lock:
                self._activate(base, _adapter_folder(adapter_path))

    def is_busy(self, base_path: str) -> bool:
        """Tell whether a stream is generating on this base model."""
        with self._lock:
            base = self._bases.get(_key(base_path))
            return base is not None and base.streams > 0

    def stats(self) -> dict[str, Any]:
        """Return what is loaded and how often things were loaded, for monitoring and tests."""
        with self._lock:
            return {
                "device": str(self.device),
                "bases": sorted(self._bases),
                "adapters": {path: list(base.adapters) for path, base in self._bases.items()},
                "base_loads": dict(self._base_loads),
                "adapter_loads": dict(self._adapter_loads),
                "adapter_evictions": self._adapter_evictions,
            }

    def unload(self, base_path: str) -> bool:
        """Free a base model and its adapters, after the stream using it ends. Return whether it was loaded."""
        with self._lock:
            base = self._bases.pop(_key(base_path), None)
        if base is None:
            return False
        with base.lock:
            base.unloaded = True
            base.model = base.tokenizer = None
            base.adapters.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def close(self) -> None:
        """Unload every model."""
        for path in self.stats()["bases"]:
            self.unload(path)

    def _stream(
        self, base: _LoadedBase, adapter_path: str | None, prompt_ids: list[int], request: GenerationRequest
    ) -> Generator[StreamEvent, None, None]:
        @contextmanager
        def turn() -> Iterator[ServedModel]:
            # base.model is read under the lock: loading the first adapter wraps it in a PeftModel.
            with base.lock:
                if base.unloaded:
                    raise ServingError(_UNLOADED)
                self._activate(base, adapter_path)
                yield base.loaded()[0]

        with self._lock:
            base.streams += 1
        try:
            model, tokenizer = base.loaded()
            yield from stream_completion(
                model, tokenizer, prompt_ids, request, end_token_ids=base.end_token_ids, step=turn
            )
        finally:
            with self._lock:
                base.streams -= 1

    def _activate(self, base: _LoadedBase, adapter_path: str | None) -> None:
        """Make the model run as adapter_path (None: the base alone). Hold base.lock.

        Streams take turns per token, so this runs before every forward pass: it
        changes the model only when the previous pass ran as something else (each
        switch walks every LoRA layer: a few milliseconds on a 135M model).
        """
        if adapter_path is None:
            if isinstance(base.model, PeftModel) and base.active != ADAPTERS_OFF:
                base.model.base_model.disable_adapter_layers()
                base.active = ADAPTERS_OFF
            return
        name = base.adapters.get(adapter_path)
        if name is None:
            name = self._load_adapter(base, adapter_path)
            base.active = None
        base.adapters.move_to_end(adapter_path)
        if base.active != name:
            model = base.adapter_model()
            if base.active in (ADAPTERS_OFF, None):
                model.base_model.enable_adapter_layers()
            if model.active_adapter != name:
                model.set_adapter(name, inference_mode=True)
            base.active = name

    def _load_adapter(self, base: _LoadedBase, adapter_path: str) -> str:
        name = f"adapter_{next(self._adapter_names)}"
        model, _ = base.loaded()
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(adapter_path, adapter_name=name)
            else:
                base.model = PeftModel.from_pretrained(model, adapter_path, adapter_name=name)
        # Not narrowed: a folder of any content can fail in peft, safetensors or torch in their own types;
        # each becomes a ModelLoadError the caller can show.
        except Exception as error:
            raise _load_error(
                "the fine-tuned model's adapter could not be loaded",
                f"could not load the adapter at {adapter_path}: {error}",
            ) from error
        model = base.adapter_model()
        model.eval()
        model.set_adapter(name, inference_mode=True)  # so eviction below never deletes the active one
        with self._lock:
            base.adapters[adapter_path] = name
            self._adapter_loads[adapter_path] += 1
            # The new adapter is loaded before the oldest goes, so a peft model always has one.
            while len(base.adapters) > self.max_adapters:
                _, evicted = base.adapters.popitem(last=False)
                model.delete_adapter(evicted)
                self._adapter_evictions += 1
        return name

    def _base(self, base_path: str) -> _LoadedBase:
        base = self._get_or_load(_key(base_path))
        self._unload_surplus(keep=base)
        return base

    def _unload_surplus(self, *, keep: _LoadedBase) -> None:
        """Past max_bases, unload the least recently used idle bases (one in use stays until it is idle)."""
        if not self.max_bases:
            return
        with self._lock:
            idle = [path for path, other in self._bases.items() if other is not keep and other.streams == 0]
            surplus = len(self._bases) - self.max_bases
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
            base = self._load_base(key)
            with self._lock:
                self._bases[key] = base
                self._base_loads[key] += 1
            return base

    def _load_base(self, path: str) -> _LoadedBase:
        if not (Path(path) / "config.json").is_file():
            raise _load_error(
                "the model's files are missing on this server", f"no model at {path} (config.json is missing)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        # Not narrowed: as for adapters, any folder content can fail in transformers, safetensors or torch.
        except Exception as error:
            raise _load_error(
                "the model could not be loaded", f"could not load the model at {path}: {error}"
            ) from error
        model.to(self.device).eval()
        return _LoadedBase(
            path=path,
            model=model,
            tokenizer=tokenizer,
            end_token_ids=_end_token_ids(model, tokenizer),
            context_length=getattr(model.config, "max_position_embeddings", None),
        )

    def _prompt_ids(
        self, base: _LoadedBase, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> list[int]:
        return render_prompt(base.loaded()[1], messages, tools)


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


def _check_request(request: GenerationRequest) -> None:
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


def _end_token_ids(model: ServedModel, tokenizer: ServingTokenizer) -> frozenset[int]:
    """Every token that ends a turn: the generation config's, the model config's and the tokenizer's."""
    found: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            found.add(value)
        elif value:
            found.update(value)
    return frozenset(found)
