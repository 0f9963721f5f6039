"""Small chat datasets and configs for the engine tests (tiny model, a few steps)."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llm.train import TrainConfig

_WORDS = "the quick brown fox jumps over a lazy dog while the model learns every token of this small chat".split()


def chat_examples(count: int, *, seed: int = 0) -> list[dict]:
    """Short one- and two-turn conversations, a system prompt on every third."""
    rng = random.Random(seed)

    def sentence(low, high):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    examples = []
    for i in range(count):
        messages = [{"role": "system", "content": "You are terse."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            messages += [
                {"role": "user", "content": sentence(3, 12)},
                {"role": "assistant", "content": sentence(3, 16)},
            ]
        examples.append({"messages": messages})
    return examples


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return path


@pytest.fixture(autouse=True)
def one_cpu_thread(monkeypatch):
    """Run the tiny models on one thread: they gain nothing from more, and on a shared
    machine OpenMP threads waiting for busy cores make each step many times slower."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the engine, and the CLI's subprocess, keep to it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    """(train, validation) files of 12 and 4 conversations."""
    return (
        write_jsonl(tmp_path / "train.jsonl", chat_examples(12, seed=1)),
        write_jsonl(tmp_path / "validation.jsonl", chat_examples(4, seed=2)),
    )


@pytest.fixture
def tiny_config(tiny_model_dir, chat_files, tmp_path):
    """A quick LoRA run: 12 examples, batch 4, one epoch (3 steps); override fields with make(...)."""
    train_file, _ = chat_files
    base = TrainConfig(
        model=str(tiny_model_dir),
        train_file=str(train_file),
        out_dir=str(tmp_path / "out"),
        epochs=1,
        batch_size=4,
        lr=1e-2,
        lora_r=4,
        lora_alpha=8,
        warmup_ratio=0.0,
    )

    def make(**changes) -> TrainConfig:
        return replace(base, **changes)

    return make


class Recorder:
    """A sink that keeps every call, plus a should_stop that answers from a script."""

    def __init__(self, stop_answers=None):
        self.calls: list[tuple[str, dict]] = []
        self.stop_answers = list(stop_answers or [])
        self.stop_asked = 0

    def __call__(self, kind: str, payload: dict) -> None:
        self.calls.append((kind, payload))

    def of(self, kind: str) -> list[dict]:
        return [payload for called, payload in self.calls if called == kind]

    def should_stop(self):
        self.stop_asked += 1
        return self.stop_answers.pop(0) if self.stop_answers else None
