"""The process-wide model pool of the web process: the one place that owns it.

Chat requests for a model with no deployment are answered from here, and so is
the playground (through chat). Deployment instances do not use it: each owns a
pool of its own so that stopping one frees exactly its memory.
"""

import threading

from django.conf import settings

from llm.serve.pool import ModelPool

_pool: ModelPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> ModelPool:
    """The process-wide pool: each base model loaded once, adapters swapped per request."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool(
                device=settings.FT_DEVICE,
                max_adapters=settings.FT_ADAPTER_CACHE_SIZE,
                max_bases=settings.FT_MAX_LOADED_MODELS,
            )
        return _pool
