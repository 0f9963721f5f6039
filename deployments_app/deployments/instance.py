"""One deployment instance's process: load the model, serve the deployment's stream, stop cleanly.

Runs as its own OS process, `manage.py serve_instance <id>` (see
`supervisor.py` for how the serving worker starts and watches it). It owns its
own ModelPool, not the web's shared one (`chat.pool`), so ending the process
frees exactly its memory. It needs only Redis, the database and the model files.
"""

import logging
import os
import shlex
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field

import redis
import torch
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from finetune_site.store import StoreError
from llm.serve.engine import percentile
from llm.serve.errors import InvalidRequest, Overloaded, ServingError
from llm.serve.pool import ModelPool
from llm.serve.schema import Completion, GenerationRequest, piece_logprobs
from llm.serve.vllm import VllmPool, VllmSettings, choose_backend

from ..catalog import ResolvedModel, resolve_model
from ..chat.pool import engine_settings
from ..chat.protocol import GENERATION_FIELDS
from ..models import Deployment, Instance
from . import services, streams

log = logging.getLogger(__name__)
# Set when the process is told to stop by its host (SIGTERM: the serving worker shuts down).
stop_requested = threading.Event()
_RECLAIM_MIN_IDLE_MS = 1000
# While Redis is away, wait this long before the first retry, doubling up to the most.
_REDIS_BACKOFF_FIRST = 0.2
_REDIS_BACKOFF_MOST = 5.0


@dataclass
class _Stats:
    """Counters since the last heartbeat, flushed to the row as increments."""

    requests: int = 0
    tokens: int = 0
    errors: int = 0
    busy_seconds: float = 0.0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=500))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, *, seconds: float, tokens: int, failed: bool) -> None:
        with self.lock:
            self.requests += 1
            self.tokens += tokens
            self.errors += int(failed)
            self.busy_seconds += seconds
            self.latencies_ms.append(seconds * 1000)

    def take(self) -> dict:
        with self.lock:
            latencies = sorted(self.latencies_ms)
            taken = {
                "requests_served": F("requests_served") + self.requests,
                "tokens_generated": F("tokens_generated") + self.tokens,
                "errors": F("errors") + self.errors,
                "busy_seconds": F("busy_seconds") + self.busy_seconds,
            }
            if latencies:
                taken["latency_p50_ms"] = percentile(latencies, 50)
                taken["latency_p95_ms"] = percentile(latencies, 95)
            self.requests = self.tokens = self.errors = 0
            self.busy_seconds = 0.0
            return taken


def load_fields(load: dict) -> dict:
    """The Instance fields for the engine's `ModelPool.load_stats()`."""
    return {
        "queue_depth": int(load.get("queue_depth") or 0),
        "running_requests": int(load.get("running") or 0),
        "recent_tokens_per_second": float(load.get("tokens_per_second") or 0.0),
        "first_token_p50_ms": load.get("first_token_p50_ms"),
        "first_token_p95_ms": load.get("first_token_p95_ms"),
    }


def serve_instance(instance_id: int, *, worker: str, threads: int, parent_pid: int | None = None) -> None:
    """Load the instance's model, serve requests until told to stop, then free the model.

    threads: torch's intra-op threads for this process. parent_pid: stop (as on
    SIGTERM) once that process is gone, so a serving worker killed outright
    leaves no instance behind.
    """
    instance = Instance.objects.select_related("deployment__owner").filter(pk=instance_id).first()
    if instance is None or not Instance.objects.filter(pk=instance_id, status=Instance.STARTING).update(
        worker=worker, pid=os.getpid(), heartbeat_at=timezone.now()
    ):
        return  # stopped before it started
    deployment = instance.deployment
    resolved = resolve_model(deployment.owner, deployment.model_id)
    if resolved is None:
        services.instance_failed_to_load(
            instance=instance, message=f"The model {deployment.model_id} no longer exists."
        )
        return
    torch.set_num_threads(threads)
    try:
        # Trained on another machine, perhaps: its files come from the store before anything reads them.
        resolved.fetch()
        pool = _pool_for(instance, resolved)
    except (ValueError, StoreError) as exc:  # a backend this deployment cannot run on, or files out of reach
        services.instance_failed_to_load(instance=instance, message=str(exc))
        return
    try:
        try:
            pool.preload(str(resolved.base_path), str(resolved.adapter_path) if resolved.adapter_path else None)
        # Not only ServingError: whatever the loader raises must reach the deployment's page.
        except Exception as exc:
            if _host_gone(parent_pid)():  # told to stop while loading (a vLLM start gives up): replaced, not failed
                instance.mark_final(Instance.DEAD, "The worker shut down before the model finished loading.")
                return
            log.exception("instance %s could not load %s", instance.public_id, deployment.model_id)
            services.instance_failed_to_load(instance=instance, message=f"Could not load the model: {exc}")
            return
        host_gone = _host_gone(parent_pid)
        if host_gone():
            instance.mark_final(Instance.DEAD, "The worker shut down before the model finished loading.")
            return
        if not instance.claim_running(worker):
            instance.mark_final(Instance.STOPPED, "Stopped before the model finished loading.")
            return
        deployment.mark_running_if_ready()
        log.info("instance %s of %s serving %s", instance.public_id, deployment.public_id, deployment.model_id)
        _Server(instance, deployment, pool, resolved, host_gone=host_gone).serve()
    finally:
        pool.close()


def _pool_for(instance: Instance, resolved: ResolvedModel) -> ModelPool | VllmPool:
    """What serves this instance: the embedded engine's pool or a vLLM server's, as the deployment asks
    (or FT_SERVING_BACKEND says); recorded on the instance's row for its page and the API."""
    deployment = instance.deployment
    backend, reason = choose_backend(
        deployment.backend or settings.FT_SERVING_BACKEND,
        settings.FT_VLLM_PYTHON,
        resolved.base_path,
        resolved.adapter_path,
    )
    log.info("instance %s runs on the %s backend (%s)", instance.public_id, backend, reason)
    Instance.objects.filter(pk=instance.pk).update(backend=backend)
    if backend == "embedded":
        if deployment.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size {deployment.tensor_parallel_size} needs vLLM, and {reason}.")
        return ModelPool(device=settings.FT_DEVICE, max_adapters=1, **engine_settings())
    vllm_settings = VllmSettings(
        python=settings.FT_VLLM_PYTHON,
        log_path=settings.FT_HOME / "logs" / f"vllm-{instance.public_id}.log",
        tensor_parallel_size=deployment.tensor_parallel_size,
        kv_cache_gib=settings.FT_VLLM_KV_CACHE_GIB,
        max_model_len=settings.FT_VLLM_MAX_MODEL_LEN,
        start_timeout=settings.FT_INSTANCE_START_TIMEOUT,
        extra_args=tuple(shlex.split(settings.FT_VLLM_ARGS)),
    )
    return VllmPool(vllm_settings, stopping=stop_requested)


def _host_gone(parent_pid: int | None):
    def gone() -> bool:
        return stop_requested.is_set() or (parent_pid is not None and os.getppid() != parent_pid)

    return gone


_CANCEL_CHECK_EVERY = 8
"""Pieces between two checks whether the caller is still there (one Redis EXISTS each)."""


class _Server:
    def __init__(
        self,
        instance: Instance,
        deployment: Deployment,
        pool: ModelPool | VllmPool,
        resolved: ResolvedModel,
        *,
        host_gone,
    ):
        self.instance, self.deployment, self.pool, self.resolved = instance, deployment, pool, resolved
        self.host_gone = host_gone
        self.key = deployment.stream_key
        self.name = instance.public_id
        self.slots = max(1, deployment.max_concurrent_requests)
        self.stats = _Stats()
        self.client = streams.sync_client()
        # Set once the deployment is cancelled: running answers end now with finish_reason "cancelled".
        self.cancelled = threading.Event()
        self.redis_away_since: float | None = None
        self.redis_backoff = _REDIS_BACKOFF_FIRST
        self.engine_died = False

    def _redis_failed(self, exc: Exception) -> None:
        """Redis went away (a restart): wait a little longer each time, then try again; never give up.

        The heartbeat goes to the database, so the instance stays alive (and keeps its place) meanwhile;
        requests and the consumer group come back with Redis (its append-only file), or are made again.
        """
        if self.redis_away_since is None:
            self.redis_away_since = time.monotonic()
            log.warning("instance %s: Redis is away (%s); retrying", self.name, exc)
        time.sleep(self.redis_backoff)
        self.redis_backoff = min(self.redis_backoff * 2, _REDIS_BACKOFF_MOST)

    def _redis_back(self) -> None:
        if self.redis_away_since is not None:
            log.info("instance %s: Redis is back after %.1f s", self.name, time.monotonic() - self.redis_away_since)
        self.redis_away_since, self.redis_backoff = None, _REDIS_BACKOFF_FIRST

    def serve(self) -> None:
        in_flight: set = set()
        stopping = False
        next_beat = 0.0
        grouped = False  # whether the stream and its group are known to exist (again, after Redis was away)
        with ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix=self.name) as executor:
            while True:
                in_flight = {f for f in in_flight if not f.done()}
                if self.host_gone():
                    stopping = True
                if not self.pool.alive():  # its vLLM server died: end as dead, so the instance is replaced
                    log.error("instance %s: %s", self.name, self.pool.alive_detail())
                    self.engine_died = True
                    break
                beat = time.monotonic() >= next_beat
                if beat:  # to the database, so it goes on while Redis is away
                    next_beat = time.monotonic() + min(settings.FT_HEARTBEAT_SECONDS, 2)
                    if self._heartbeat() != Instance.RUNNING:
                        stopping = True
                        self._cancel_if_deployment_cancelled(in_flight)
                try:
                    if beat and not stopping:
                        # The request stream expires when unused and is lost with a Redis without
                        # persistence: keep it, and its group, in being while this instance serves.
                        streams.ensure_group(self.client, self.key)
                        if len(in_flight) < self.slots:
                            for msg_id, fields in self._reclaim(self.slots - len(in_flight)):
                                in_flight.add(executor.submit(self._answer, msg_id, fields, reclaimed=True))
                    elif not grouped:
                        streams.ensure_group(self.client, self.key)
                    grouped = True
                    if stopping:
                        # Scaling down never drops a request: finish what was taken; the last
                        # instance also answers what is still queued, since no one else will.
                        if not in_flight:
                            leftovers = self._drain() if self._is_last() else []
                            if not leftovers:
                                break
                            in_flight |= {executor.submit(self._answer, msg_id, fields) for msg_id, fields in leftovers}
                        wait(in_flight, timeout=0.2, return_when=FIRST_COMPLETED)
                        continue
                    if len(in_flight) >= self.slots:
                        wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                        continue
                    batch = self.client.xreadgroup(
                        streams.GROUP, self.name, {self.key: ">"}, count=self.slots - len(in_flight), block=500
                    )
                    self._redis_back()
                    for _stream, messages in batch or []:
                        for msg_id, fields in messages:
                            in_flight.add(executor.submit(self._answer, msg_id, fields))
                except redis.RedisError as exc:
                    if not streams.is_transient(exc):
                        raise
                    if stopping and not in_flight:
                        break  # nothing taken is left to finish; what is queued waits in Redis for another instance
                    grouped = False
                    self._redis_failed(exc)
        self._heartbeat()
        try:
            self.client.xgroup_delconsumer(self.key, streams.GROUP, self.name)
        except redis.RedisError:  # Redis is away: the next instance's _reclaim removes this consumer
            log.warning("instance %s: could not leave the consumer group", self.name, exc_info=True)
        if self.engine_died:
            self.instance.mark_final(Instance.DEAD, self.pool.alive_detail())
            self.client.close()
            return
        final = Instance.DEAD if self.host_gone() and self._status() == Instance.RUNNING else Instance.STOPPED
        self.instance.mark_final(final, "The worker shut down." if final == Instance.DEAD else "")
        self.client.close()

    def _cancel_if_deployment_cancelled(self, in_flight: set) -> None:
        if not self.cancelled.is_set():
            status = Deployment.objects.filter(pk=self.deployment.pk).values_list("status", flat=True).first()
            if status != Deployment.CANCELLED:
                return
            self.cancelled.set()
        if in_flight:
            self.pool.finish_all("cancelled")  # again at each heartbeat: an answer may have joined since

    def _is_last(self) -> bool:
        return (
            not Instance.objects.filter(deployment_id=self.deployment.pk, status=Instance.RUNNING)
            .exclude(pk=self.instance.pk)
            .exists()
        )

    def _drain(self) -> list:
        batch = self.client.xreadgroup(streams.GROUP, self.name, {self.key: ">"}, count=self.slots, block=300)
        return [(msg_id, fields) for _stream, messages in batch or [] for msg_id, fields in messages]

    def _status(self) -> str | None:
        return Instance.objects.filter(pk=self.instance.pk).values_list("status", flat=True).first()

    def _heartbeat(self) -> str | None:
        Instance.objects.filter(pk=self.instance.pk).update(
            heartbeat_at=timezone.now(), **self.stats.take(), **load_fields(self.pool.load_stats())
        )
        return self._status()

    def _reclaim(self, room: int) -> list:
        """Take over requests read by instances that died before answering them."""
        live = set(
            Instance.objects.filter(deployment_id=self.deployment.pk, status__in=Instance.LIVE).values_list(
                "public_id", flat=True
            )
        )
        taken = []
        for consumer in self.client.xinfo_consumers(self.key, streams.GROUP):
            name = streams.as_text(consumer["name"])
            if name in live or len(taken) >= room:
                continue
            if consumer["pending"]:
                pending = self.client.xpending_range(
                    self.key, streams.GROUP, min="-", max="+", count=room - len(taken), consumername=name
                )
                ids = [p["message_id"] for p in pending]
                if ids:
                    claimed = self.client.xclaim(self.key, streams.GROUP, self.name, _RECLAIM_MIN_IDLE_MS, ids)
                    taken += [(msg_id, fields) for msg_id, fields in claimed if fields]
            else:
                self.client.xgroup_delconsumer(self.key, streams.GROUP, name)
        return taken

    def _answer(self, msg_id, fields, *, reclaimed: bool = False) -> None:
        started = time.monotonic()
        tokens, failed = 0, False
        request_id, params, deadline = streams.decode_request(fields)
        reply = streams.reply_key(request_id)
        try:
            if deadline and time.time() > deadline:
                return  # the caller has already given up waiting
            if reclaimed and self.client.exists(reply):
                self._send(reply, streams.error_event(streams.STOPPED_MID_ANSWER, status=503))
                return
            if self.cancelled.is_set():
                self._send(reply, streams.error_event(_CANCELLED_BEFORE_START, status=503))
                return
            tokens = self._generate(request_id, reply, params)
        except InvalidRequest as exc:
            self._send(reply, streams.error_event(str(exc), status=400, param=exc.param))
        except Overloaded as exc:  # the engine's memory stayed full: the caller retries later
            self._send(reply, streams.error_event(str(exc), status=429, retry_after=exc.retry_after))
        except Exception as exc:  # the caller gets it in the error shape
            failed = True
            log.exception("instance %s failed a request", self.name)
            message = (
                str(exc)
                if isinstance(exc, ServingError)
                else f"The model failed while answering: {type(exc).__name__}: {exc}"
            )
            try:
                self._send(reply, streams.error_event(message, status=500))
            except redis.RedisError:  # the failure was Redis going away: nobody can be told on it
                pass
        finally:
            try:
                self.client.xack(self.key, streams.GROUP, msg_id)
                self.client.xdel(self.key, msg_id)
            except redis.RedisError:  # Redis is away; the caller, whose reads failed too, was told so
                log.warning("instance %s: could not acknowledge request %s", self.name, request_id, exc_info=True)
            self.stats.record(seconds=time.monotonic() - started, tokens=tokens, failed=failed)

    def _generate(self, request_id: str, reply: str, params: dict) -> int:
        """Stream one answer to its reply stream; return about how many tokens it took."""
        request = GenerationRequest(
            base_path=str(self.resolved.base_path),
            adapter_path=str(self.resolved.adapter_path) if self.resolved.adapter_path else None,
            **{k: params[k] for k in GENERATION_FIELDS if k in params},
        )
        cancel = streams.cancel_key(request_id)
        # On cancel the engine ends the answer itself, with finish_reason "cancelled" (finish_all).
        with closing(self.pool.generate_stream(request)) as events:
            for number, event in enumerate(events, start=1):
                if isinstance(event, Completion):
                    self._send(reply, streams.done_event(event))
                    return event.completion_tokens
                if event or piece_logprobs(event):  # an empty piece may carry logprobs of held-back tokens
                    self._send(reply, streams.piece_event(event))
                if number % _CANCEL_CHECK_EVERY == 0 and self.client.exists(cancel):
                    # About one token a piece; closing the stream stops generation.
                    log.info(
                        "instance %s: the caller of %s left; stopped after %d pieces", self.name, request_id, number
                    )
                    return number
        return 0

    def _send(self, reply: str, event: dict) -> None:
        streams.send_event(self.client, reply, event)


_CANCELLED_BEFORE_START = "The deployment was cancelled before this request began; send it again."
