"""The process-wide model pool of the web process: the one place that owns it.

Chat requests for a model with no deployment are answered from here, and so is
the playground (through chat). Deployment instances do not use it: each is a
process with a pool of its own (built with `engine_settings()`, so the same
engine answers everywhere), so that stopping one frees exactly its memory.
"""

import threading

from django.conf import settings

from llm.serve.pool import ModelPool

_pool: ModelPool | None = None
_pool_lock = threading.Lock()


def engine_settings() -> dict:
    """The serving engine's settings, for every ModelPool of this project (web and deployment instances)."""
    return {
        "dtype": settings.FT_SERVING_DTYPE,
        "max_batch": settings.FT_MAX_BATCH,
        "kv_memory_bytes": settings.FT_KV_CACHE_MB << 20,
        "prefill_tokens": settings.FT_PREFILL_TOKENS,
        "queue_timeout": settings.FT_ENGINE_QUEUE_SECONDS,
    }


def get_pool() -> ModelPool:
    """The process-wide pool: each base model loaded once, adapters swapped per request."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool(
                device=settings.FT_DEVICE,
                max_adapters=settings.FT_ADAPTER_CACHE_SIZE,
                max_bases=settings.FT_MAX_LOADED_MODELS,
                **engine_settings(),
            )
        return _pool
