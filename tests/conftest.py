"""Fixtures shared by every test file.

Models are built once into var/test-cache (ignored by git) and reused across
runs: the tiny model in seconds, the bundled SmolLM2 in about half a minute.
"""

import os
from pathlib import Path

import pytest
import redis
from django.db.backends.signals import connection_created

from finetune_site.celery import app
from llm.bundled import build_tiny_model, prepare_bundled_model

from .live import fresh_postgres_database, postgres_up


def _readers_do_not_lock_tables(sender, connection, **kwargs):
    """Tests on SQLite share one in-memory database through SQLite's shared cache, where a reader holds a
    table lock that makes a writer in another thread fail at once ("database table is locked"): no busy
    timeout applies there. The product's own file database runs in WAL mode, where readers never block the
    writer; reading uncommitted rows gives threaded tests that same behaviour."""
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA read_uncommitted = 1")


connection_created.connect(_readers_do_not_lock_tables)

# Deployment instances run on the embedded engine unless a test asks for vLLM (tests/test_vllm_backend.py),
# whatever the environment running the tests says: `make test` installs vLLM, and "auto" would move every
# deployment test onto it. Instance processes the tests start read it from here.
os.environ["FT_SERVING_BACKEND"] = "embedded"

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = REPO / "var" / "test-cache"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template."""
    return build_tiny_model(TEST_CACHE / "tiny-random-smollm2")


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with untied embeddings: its greedy answers wander through the vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = tmp_path_factory.mktemp("chatty-model")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the bundled GGUF."""
    return prepare_bundled_model(TEST_CACHE / "SmolLM2-135M-Instruct", progress=lambda line: None)


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    if not (SHARED_DATA / "banking77" / "train.csv").exists():
        pytest.skip("../shared/data/banking77 is not present")
    return SHARED_DATA / "banking77"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, tiny_model_dir, bundled_model_dir):
    """The whole product running as `make run` runs it, in its own FT_HOME and port."""
    from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID

    from .live import start_stack, stop_stack

    running = start_stack(
        tmp_path_factory.mktemp("stack"), {TINY_MODEL_ID: tiny_model_dir, BUNDLED_MODEL_ID: bundled_model_dir}
    )
    yield running
    stop_stack(running)


@pytest.fixture(autouse=True)
def _in_memory_channel_layer(request):
    """Unit tests publish to an in-memory layer; live tests use the stack's real Redis."""
    if not request.config.pluginmanager.hasplugin("django"):
        yield
        return
    settings = request.getfixturevalue("settings")
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.FT_SERVING_BACKEND = os.environ["FT_SERVING_BACKEND"]
    # A job that succeeds here would queue its automatic evaluation to a broker these tests do not
    # run; tests/evals/test_auto_eval.py turns it on where it is the thing under test.
    settings.FT_AUTO_EVAL = False
    yield


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """ "" for the default SQLite file in FT_HOME, else a fresh PostgreSQL database (race tests run on both)."""
    if request.param == "sqlite":
        yield ""
        return
    if not postgres_up():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is needed for this test")
    with fresh_postgres_database(f"ft_{request.module.__name__.rsplit('.', 1)[-1]}") as url:
        yield url


BROKER_URL = "redis://127.0.0.1:6379/14"
"""An empty database of the local Redis, as the Celery broker of tests that read what it holds."""


@pytest.fixture
def broker_redis(monkeypatch):
    """The Celery app's broker pointed at an empty database of the local Redis; yields a client of it."""
    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis on 127.0.0.1:6379 is needed for this test")
    monkeypatch.setattr(app.conf, "broker_url", BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
