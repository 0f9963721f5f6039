"""Continuous batching: one loop per base model answers every request on it in shared forward passes.

The loop runs on a thread of its own. Each turn it
1. drops what was cancelled (its row is free for the next turn),
2. admits waiting requests while a row and KV memory are free (a request that
   waits longer than `queue_timeout` is refused with `Overloaded`),
3. runs one chunk of prefill: up to `prefill_tokens` prompt tokens of the newest
   requests, in one padded pass, so a long prompt is read over several turns
   and never freezes the streams already running,
4. runs one decoding pass for every running row, each row with its own adapter,
   length and sampling settings, and hands each new token to its request. A request
   that asks for penalties, a logit bias, logprobs or a grammar (response_format, a
   forced tool call) has its own row's scores shaped first (processors.py); the
   others' rows cost nothing more.

Requests join and leave between any two passes; nobody waits for a batch to
finish. A request reserves its prompt plus max_tokens of KV memory when it is
admitted, so the streams already running always finish.
"""

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .constraints import GrammarCompiler, grammar_text
from .errors import InvalidRequest, Overloaded, ServingError
from .hf import CausalLM, TokenDecoder
from .kv import ATTENTION, SlotKV, attending, positions, register
from .lora import row_adapters, rows_using
from .processors import RowShaper, TokenTable, needs_shaping
from .sampling import make_generator, sample_next_token
from .schema import Completion, GenerationRequest, StreamEvent, TextPiece
from .text import IncrementalDecoder, OutputFilter

log = logging.getLogger(__name__)

register()

_RATE_WINDOW_SECONDS = 10.0
_LATENCIES_KEPT = 1000
_IDLE_WAIT_SECONDS = 0.5
CLOSED = "the model was unloaded while the request was answered; send it again"


class Stream:
    """One request's answer as the engine produces it: text pieces, then one Completion (or an error).

    Read it blocking (it is an iterator) or from asyncio (`async for event in stream.events()`).
    `close()`, or dropping it unfinished, cancels the request: its batch row is free before the
    next forward pass.
    """

    def __init__(self, engine: "BatchEngine") -> None:
        self._engine = engine
        self._items: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        self._wake: Callable[[], None] | None = None
        self.cancelled = False
        self.done = False
        """The last event (a Completion or an error) has been read."""

    def put(self, item: StreamEvent | BaseException) -> None:
        """Engine side: hand over the next event."""
        self._items.put(item)
        wake = self._wake
        if wake is not None:
            wake()

    def close(self) -> None:
        """Stop generating for this request (nothing happens once it has ended)."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._engine.wake()

    def __del__(self) -> None:
        self.close()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StreamEvent:
        if self.done:
            raise StopIteration
        while True:
            try:
                return self._take(self._items.get(timeout=1.0))
            except queue.Empty:
                self._engine.check_alive()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The same events for an asyncio consumer: the engine wakes the loop, no thread waits."""
        import asyncio

        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        self._wake = wake
        try:
            while not self.done:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._items.empty():
                        try:
                            await asyncio.wait_for(ready.wait(), timeout=1.0)
                        except TimeoutError:
                            self._engine.check_alive()
                    continue
                yield self._take(item)
        finally:
            self._wake = None
            self.close()

    def _take(self, item: StreamEvent | BaseException) -> StreamEvent:
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if isinstance(item, Completion):
            self.done = True
        return item


@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    request: GenerationRequest
    adapter_id: int | None
    stream: Stream
    pick: Callable[[torch.Tensor], int]
    greedy: bool
    decoder: IncrementalDecoder
    output: OutputFilter
    reserved: int
    """Prompt plus max_tokens: the KV positions this request may need."""
    submitted: float = field(default_factory=time.monotonic)
    computed: int = 0
    """Tokens whose keys and values are in the store."""
    generated: int = 0
    next_input: int = -1
    """The last token picked, fed to the next decoding pass."""
    row: int = -1
    on_finish: Callable[[], None] | None = None
    shaper: RowShaper | None = None
    """Penalties, bias, grammar and logprobs of this request; None (the fast path) when it asks for none."""


@dataclass
class EngineLoad:
    queue_depth: int
    running: int
    tokens_per_second: float
    first_token_ms: list[float]


class BatchEngine:
    """Continuous batching over one loaded model; thread-safe `submit`, one loop thread."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: TokenDecoder,
        *,
        end_token_ids: frozenset[int],
        max_batch: int = 16,
        kv_memory_bytes: int = 2 << 30,
        prefill_tokens: int = 256,
        queue_timeout: float = 30.0,
        name: str = "engine",
        threads: int | None = None,
    ) -> None:
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError("max_batch and prefill_tokens must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.end_token_ids = end_token_ids
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.queue_timeout = queue_timeout
        self.threads = threads or torch.get_num_threads()
        _use_slot_attention(model)
        config = model.config
        heads = config.num_attention_heads
        self.kv = SlotKV(
            rows=min(4, max_batch),
            layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            # On the CPU, attention reads the store in float32 whatever the weights (see kv._grouped_attention).
            dtype=torch.float32 if model.device.type == "cpu" else next(_parameters(model)).dtype,
            device=model.device,
        )
        self.kv_tokens = max(1, kv_memory_bytes // self.kv.bytes_per_token)
        self._lock = threading.Condition()
        self._incoming: list[_Sequence] = []
        self._finish_all: str | None = None
        self._closed = False
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._owner: dict[int, _Sequence] = {}
        self._produced: deque[tuple[float, int]] = deque()
        self._first_token_ms: deque[float] = deque(maxlen=_LATENCIES_KEPT)
        self._failure: BaseException | None = None
        self.vocab_size = int(config.vocab_size)
        self._tokens = TokenTable(tokenizer)
        self._grammars = GrammarCompiler(tokenizer, vocab_size=self.vocab_size, end_token_ids=end_token_ids)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ----- the callers' side -------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        request: GenerationRequest,
        *,
        adapter_id: int | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> Stream:
        """Queue a rendered prompt; its answer arrives on the returned Stream."""
        reserved = len(prompt_ids) + request.max_tokens
        if reserved > self.kv_tokens:
            raise InvalidRequest(
                [
                    f"the request needs {reserved} tokens of KV memory and this server holds at most "
                    f"{self.kv_tokens}; shorten the messages or lower max_tokens"
                ]
            )
        greedy = not request.do_sample or request.temperature <= 0
        stream = Stream(self)
        sequence = _Sequence(
            prompt_ids=list(prompt_ids),
            request=request,
            adapter_id=adapter_id,
            stream=stream,
            pick=partial(
                sample_next_token,
                temperature=request.temperature,
                top_p=request.top_p,
                do_sample=request.do_sample,
                generator=make_generator(request.seed, self.kv.device),
            ),
            greedy=greedy,
            decoder=IncrementalDecoder(self.tokenizer),
            output=OutputFilter(stop=request.stop_strings, tools=bool(request.offered_tools)),
            reserved=reserved,
            on_finish=on_finish,
            shaper=self._shaper(request),
        )
        with self._lock:
            self.check_alive()
            self._incoming.append(sequence)
            self._lock.notify()
        return stream

    def _shaper(self, request: GenerationRequest) -> RowShaper | None:
        """The request's per-row work on its scores, or None when it asks for none (bad settings raise here)."""
        grammar = grammar_text(request)
        if grammar is None and not needs_shaping(request):
            return None
        return RowShaper(
            request,
            vocab_size=self.vocab_size,
            device=self.kv.device,
            tokens=self._tokens,
            grammar=self._grammars.matcher(grammar, self.kv.device, param=_grammar_param(request)) if grammar else None,
        )

    def finish_all(self, finish_reason: str) -> None:
        """End every stream now, each with a Completion of the text so far and this finish_reason."""
        with self._lock:
            self._finish_all = finish_reason
            self._lock.notify()

    def load(self) -> EngineLoad:
        with self._lock:
            now = time.monotonic()
            tokens = sum(count for at, count in self._produced if at >= now - _RATE_WINDOW_SECONDS)
            return EngineLoad(
                queue_depth=len(self._incoming) + len(self._waiting),
                running=len(self._running) + len(self._prefilling),
                tokens_per_second=tokens / _RATE_WINDOW_SECONDS,
                first_token_ms=list(self._first_token_ms),
            )

    def busy(self) -> bool:
        with self._lock:
            return bool(self._incoming or self._waiting or self._prefilling or self._running)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def check_alive(self) -> None:
        if self._failure is not None:
            raise ServingError(f"the serving engine stopped: {self._failure}")
        if self._closed:
            raise ServingError(CLOSED)

    def close(self) -> None:
        """Stop the loop; every unfinished stream ends with an error."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ----- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's own count (see pool.single_threaded)
        try:
            with torch.inference_mode():
                while self._turn():
                    pass
        except BaseException as error:  # a bug in the loop itself: no stream may hang on it
            log.exception("the serving engine stopped")
            self._failure = error
            self._end_everything(ServingError(f"the serving engine stopped: {error}"))
            raise
        self._end_everything(ServingError(CLOSED))

    def _turn(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            if not (self._incoming or self._waiting or self._prefilling or self._running or self._finish_all):
                self._lock.wait(timeout=_IDLE_WAIT_SECONDS)
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            finish_all, self._finish_all = self._finish_all, None
        if finish_all:
            for sequence in [*self._waiting, *self._prefilling, *self._running]:
                self._finish(sequence, finish_all)
            self._waiting.clear()
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._guarded(self._prefill_step, self._prefilling)
        if self._running:
            self._guarded(self._decode_step, self._running)
        return True

    def _guarded(self, step: Callable[[], None], sequences: list[_Sequence]) -> None:
        """Run a pass; if the model fails, the requests in it fail (with the reason) and the loop goes on."""
        try:
            step()
        except Exception as error:  # any failure inside the model: its requests get it, the others go on
            log.exception("a batched forward pass failed")
            failure = ServingError(f"The model failed while answering: {type(error).__name__}: {error}")
            for sequence in list(sequences):
                self._release(sequence)
                sequence.stream.put(failure)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._waiting if s.stream.cancelled]:
            self._waiting.remove(sequence)
            self._notify_finish(sequence)
        for sequence in [s for s in (*self._prefilling, *self._running) if s.stream.cancelled]:
            self._release(sequence)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting:
            sequence = self._waiting[0]
            active = [*self._running, *self._prefilling]
            longest = max([s.reserved for s in active] + [sequence.reserved])
            if len(active) < self.max_batch and (len(active) + 1) * longest <= self.kv_tokens:
                self._waiting.popleft()
                sequence.row = self._free_row()
                self._owner[sequence.row] = sequence
                self._prefilling.append(sequence)
                continue
            break
        for sequence in [s for s in self._waiting if now - s.submitted > self.queue_timeout]:
            self._waiting.remove(sequence)
            self._notify_finish(sequence)
            sequence.stream.put(
                Overloaded(
                    f"the model is answering as many requests as its memory holds and this one waited "
                    f"{self.queue_timeout:g} s; send it again later",
                    retry_after=self._retry_after(),
                )
            )

    def _retry_after(self) -> float:
        """Seconds until the running request closest to done should finish, at the current rate."""
        rate = self.load().tokens_per_second / max(1, len(self._running))
        left = min((s.request.max_tokens - s.generated for s in self._running), default=0)
        return float(min(60, max(1, math.ceil(left / rate)))) if rate > 0 else 5.0

    def _free_row(self) -> int:
        row = next(r for r in range(self.max_batch * 2) if r not in self._owner)
        if row >= self.kv.rows:
            self.kv.ensure_rows(row + 1)
        return row

    def _prefill_step(self) -> None:
        budget = self.prefill_tokens
        batch: list[tuple[_Sequence, int]] = []
        for sequence in self._prefilling:
            if budget <= 0:
                break
            count = min(len(sequence.prompt_ids) - sequence.computed, budget)
            batch.append((sequence, count))
            budget -= count
        sequences = [s for s, _ in batch]
        counts = [c for _, c in batch]
        starts = [s.computed for s in sequences]
        query_length = max(counts)
        device = self.kv.device
        ids = torch.zeros((len(batch), query_length), dtype=torch.long, device=device)
        for i, (sequence, count) in enumerate(batch):
            ids[i, :count] = torch.tensor(sequence.prompt_ids[sequence.computed : sequence.computed + count])
        completing = [i for i, (s, c) in enumerate(batch) if s.computed + c == len(s.prompt_ids)]
        keep = sorted({counts[i] - 1 for i in completing}) or [query_length - 1]
        with (
            attending(self.kv, [s.row for s in sequences], starts, counts, query_length),
            rows_using(row_adapters([s.adapter_id for s in sequences], device)),
        ):
            logits = self.model(
                input_ids=ids,
                position_ids=positions(starts, query_length, device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, device=device),
            ).logits
        for sequence, count in batch:
            sequence.computed += count
        for i in completing:
            sequence = sequences[i]
            self._prefilling.remove(sequence)
            self._running.append(sequence)
            try:
                token = self._pick(sequence, logits[i, keep.index(counts[i] - 1)].float())
            except Exception as error:  # noqa: BLE001 - the request's own grammar: it alone fails
                self._fail_row(sequence, error)
                continue
            self._emit(sequence, token)

    def _decode_step(self) -> None:
        self._pack()
        sequences = list(self._running)
        starts = [s.computed for s in sequences]
        device = self.kv.device
        ids = torch.tensor([[s.next_input] for s in sequences], dtype=torch.long, device=device)
        with (
            attending(self.kv, slice(0, len(sequences)), starts, [1] * len(sequences), 1),
            rows_using(row_adapters([s.adapter_id for s in sequences], device)),
        ):
            logits = self.model(
                input_ids=ids, position_ids=positions(starts, 1, device), use_cache=False, logits_to_keep=1
            ).logits[:, -1]
        scores = logits.float()  # float32 first: argmax over bfloat16 is slow on CPUs
        failed = set()
        for i, sequence in enumerate(sequences):
            if sequence.shaper is not None:
                try:
                    scores[i] = sequence.shaper.shape(scores[i])
                except Exception as error:  # noqa: BLE001 - the request's own grammar: it alone fails
                    self._fail_row(sequence, error)
                    failed.add(i)
        greedy = scores.argmax(dim=-1).tolist()
        for i, sequence in enumerate(sequences):
            if i in failed:
                continue
            sequence.computed += 1
            token = greedy[i] if sequence.greedy else sequence.pick(scores[i])
            self._emit(sequence, token)

    def _fail_row(self, sequence: _Sequence, error: Exception) -> None:
        """One request's own shaping (its grammar, from its own schema) failed: it alone ends, its batch goes on."""
        log.warning("a request's constrained decoding failed: %s: %s", type(error).__name__, error)
        self._release(sequence)
        sequence.stream.put(ServingError(f"Constrained decoding failed for this request: {error}"))

    def _pick(self, sequence: _Sequence, scores: torch.Tensor) -> int:
        """The next token from one row's float32 scores, shaped first if the request asks for it."""
        if sequence.shaper is not None:
            scores = sequence.shaper.shape(scores)
        return int(scores.argmax()) if sequence.greedy else sequence.pick(scores)

    def _emit(self, sequence: _Sequence, token: int) -> None:
        if sequence.generated == 0:
            self._first_token_ms.append((time.monotonic() - sequence.submitted) * 1000)
        sequence.generated += 1
        sequence.next_input = token
        self._produced.append((time.monotonic(), 1))
        while self._produced and self._produced[0][0] < time.monotonic() - _RATE_WINDOW_SECONDS:
            self._produced.popleft()
        if token in self.end_token_ids:
            self._finish(sequence, "stop")
            return
        shaper = sequence.shaper
        if shaper is not None:
            try:
                shaper.accept(token)
            except Exception as error:  # noqa: BLE001 - the request's own grammar: it alone fails
                self._fail_row(sequence, error)
                return
        self._put(sequence, sequence.output.push(sequence.decoder.push(token)))
        if sequence.output.stopped or (shaper is not None and shaper.done):
            self._finish(sequence, "stop")
        elif sequence.generated >= sequence.request.max_tokens:
            self._finish(sequence, "length")

    def _put(self, sequence: _Sequence, piece: str, *, last: bool = False) -> None:
        """Hand a piece of text to the stream, with the logprobs of the tokens generated since the last one.

        Logprobs of tokens whose text is held back (a possible stop string, tool-call markup) wait for
        the next piece; the last call hands over what is left even with no text.
        """
        shaper = sequence.shaper
        if shaper is not None and shaper.wants_logprobs and (piece or last):
            logprobs = shaper.unsent()
            if piece or logprobs:
                sequence.stream.put(TextPiece(piece, logprobs))
        elif piece:
            sequence.stream.put(piece)

    def _finish(self, sequence: _Sequence, finish_reason: str) -> None:
        self._release(sequence)
        self._put(sequence, sequence.output.push(sequence.decoder.flush()))
        content, tool_calls, piece = sequence.output.finish()
        self._put(sequence, piece, last=True)
        if not sequence.request.parallel_tool_calls:
            tool_calls = tool_calls[:1]
        shaper = sequence.shaper
        sequence.stream.put(
            Completion(
                content=content,
                finish_reason="tool_calls" if tool_calls and finish_reason in ("stop", "length") else finish_reason,
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=sequence.generated,
                tool_calls=tool_calls,
                logprobs=list(shaper.entries) if shaper is not None and shaper.wants_logprobs else None,
            )
        )

    def _release(self, sequence: _Sequence) -> None:
        """Free the sequence's row; it takes no further part in any pass."""
        for group in (self._prefilling, self._running):
            if sequence in group:
                group.remove(sequence)
        if self._owner.get(sequence.row) is sequence:
            del self._owner[sequence.row]
        sequence.row = -1
        self._notify_finish(sequence)

    def _notify_finish(self, sequence: _Sequence) -> None:
        if sequence.on_finish is not None:
            on_finish, sequence.on_finish = sequence.on_finish, None
            on_finish()

    def _pack(self) -> None:
        """Put the running sequences in rows 0..n-1 (in order), so a decoding pass reads the store without a copy."""
        for target, sequence in enumerate(self._running):
            if sequence.row == target:
                continue
            occupant = self._owner.get(target)
            if occupant is not None:
                spare = self._free_row()
                self.kv.move_row(target, spare, occupant.computed)
                self._owner[spare] = occupant
                occupant.row = spare
            self.kv.move_row(sequence.row, target, sequence.computed)
            del self._owner[sequence.row]
            self._owner[target] = sequence
            sequence.row = target
        longest = max((s.computed + 1 for s in [*self._running, *self._prefilling]), default=0)
        self.kv.shrink(longest)

    def _end_everything(self, error: ServingError) -> None:
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for sequence in [*self._waiting, *self._prefilling, *self._running]:
            self._release(sequence)
            sequence.stream.put(error)
        self._waiting.clear()


def _grammar_param(request: GenerationRequest) -> str:
    """The request field a grammar that does not compile is blamed on."""
    return "response_format" if request.response_format else "tool_choice"


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty ascending list."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _use_slot_attention(model: Any) -> None:
    """Switch the model's attention to the engine's (see kv.py); loading with attn_implementation does the same."""
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def _parameters(model: Any) -> Iterator[torch.Tensor]:
    return iter(model.parameters())
