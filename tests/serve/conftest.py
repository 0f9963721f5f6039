"""Models and adapters for the serving tests.

The shared tiny model ties its input and output embeddings, so, being random, it
greedily repeats one token forever: any two generators would agree on it. The
chatty model is the same tiny Llama with untied embeddings, whose greedy output
wanders through the vocabulary, so comparisons between generators mean something.
"""

from pathlib import Path

import pytest
import torch

from llm.serve.pool import ModelPool

from .helpers import make_lora_adapter


def pytest_configure(config):
    config.addinivalue_line("markers", "realmodel: uses the bundled SmolLM2-135M-Instruct weights")


@pytest.fixture(scope="session")
def adapters(chatty_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three different random adapters for the chatty model, by name."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora_adapter(chatty_model_dir, root / name, seed=seed) for seed, name in enumerate("abc")}


@pytest.fixture
def pool():
    pool = ModelPool(device="cpu", dtype="float32", max_adapters=4)
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and a busy shared machine slows two threads a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
