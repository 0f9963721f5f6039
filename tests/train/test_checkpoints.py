"""Checkpoints do not fill the disk: retention, a floor on save_every, a free-space check, damage detection."""

import errno
from pathlib import Path

import pytest
import torch

from llm.train import checkpoint as ckpt
from llm.train import train
from llm.train.config import STATE_FILE

from .conftest import Recorder, chat_examples, write_jsonl


def states(out_dir) -> dict[int, dict]:
    return {step: ckpt.load_state(ckpt.checkpoint_dir(out_dir, step)) for step in ckpt.checkpoint_steps(out_dir)}


def test_only_the_newest_checkpoints_stay_and_only_the_newest_keeps_the_optimizer(tiny_config):
    config = tiny_config(epochs=2, save_every=1, keep_checkpoints=2)  # 6 steps, a checkpoint at each
    sink = Recorder()

    train(config, sink=sink)

    assert ckpt.checkpoint_steps(config.out_dir) == [5, 6]
    kept = states(config.out_dir)
    assert "optimizer" not in kept[5] and "optimizer" in kept[6]
    assert [payload["step"] for payload in sink.of("checkpoint_removed")] == [1, 2, 3, 4]
    assert not list((Path(config.out_dir) / "checkpoints").glob("*.partial*"))


def test_the_checkpoint_with_the_best_validation_loss_is_kept_too(tiny_config, tmp_path):
    def answering(word: str, questions: range) -> list[dict]:
        return [
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"{word} " * 8},
                ]
            }
            for i in questions
        ]

    # Training teaches "yes" to every question; the validation answers say "no": the more the model
    # learns, the higher the validation loss. (A learning rate of 0.3 on chat data did this by chance;
    # on a fresh install on 2026-12-03 its validation loss fell at every evaluation, old code too.)
    train_file = write_jsonl(tmp_path / "yes.jsonl", answering("yes", range(12)))
    validation = write_jsonl(tmp_path / "no.jsonl", answering("no", range(100, 104)))
    config = tiny_config(
        train_file=str(train_file), epochs=4, validation_file=str(validation), eval_every=3, keep_checkpoints=1
    )
    sink = Recorder()

    train(config, sink=sink)

    losses = {payload["step"]: payload["eval_loss"] for payload in sink.of("eval")}
    best = min(losses, key=losses.get)
    assert best != max(losses)  # the premise: the best is not the newest
    assert ckpt.checkpoint_steps(config.out_dir) == [best, max(losses)]


def test_keep_zero_keeps_every_checkpoint(tiny_config):
    config = tiny_config(epochs=2, save_every=1, keep_checkpoints=0)

    train(config)

    assert ckpt.checkpoint_steps(config.out_dir) == [1, 2, 3, 4, 5, 6]


def test_save_every_is_raised_to_at_most_a_hundred_checkpoints_a_run(tiny_config, tmp_path):
    train_file = write_jsonl(tmp_path / "many.jsonl", chat_examples(202))
    config = tiny_config(train_file=str(train_file), batch_size=1, save_every=1, keep_checkpoints=1)
    sink = Recorder()

    train(config, sink=sink)

    steps = [payload["step"] for payload in sink.of("checkpoint")]
    assert steps == list(range(3, 202, 3)) + [202]
    warnings = [e["message"] for e in sink.of("event") if e["level"] == "warn"]
    assert any("save_every=1 would write 202 checkpoints; checkpointing every 3 steps" in w for w in warnings)


def test_a_checkpoint_that_would_not_fit_stops_the_run_and_keeps_the_earlier_ones(tiny_config, monkeypatch):
    config = tiny_config(epochs=2)  # checkpoints after step 3 and 6
    real = ckpt.shutil.disk_usage
    saves = []

    def disk_usage(path):
        usage = real(path)
        if saves:  # the second checkpoint finds the disk nearly full
            return usage._replace(free=10 * 2**20)
        saves.append(path)
        return usage

    monkeypatch.setattr(ckpt.shutil, "disk_usage", disk_usage)

    with pytest.raises(ckpt.DiskFull) as full:
        train(config)

    assert "Not enough disk space for the checkpoint at step 6" in full.value.strerror
    assert ckpt.checkpoint_steps(config.out_dir) == [3]
    assert ckpt.damage(ckpt.checkpoint_dir(config.out_dir, 3)) is None
    assert not list((Path(config.out_dir) / "checkpoints").glob("*.partial*"))


def test_a_disk_that_fills_while_writing_leaves_no_partial_checkpoint(tiny_config, monkeypatch):
    config = tiny_config()
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(STATE_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)

    with pytest.raises(ckpt.DiskFull) as full:
        train(config)

    assert "The disk filled while writing the checkpoint at step 3" in full.value.strerror
    assert not (Path(config.out_dir) / "checkpoints").exists() or not list(
        (Path(config.out_dir) / "checkpoints").iterdir()
    )


def test_damage_names_a_torn_weights_file_or_state(tiny_config):
    config = tiny_config(epochs=2, keep_checkpoints=0)
    train(config)
    good, torn, broken = (ckpt.checkpoint_dir(config.out_dir, step) for step in (3, 6, 6))
    assert ckpt.damage(good) is None

    weights = next(torn.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert ckpt.damage(torn).startswith("step-6: SafetensorError")

    (broken / STATE_FILE).write_bytes(b"not a state")
    assert ckpt.damage(broken).startswith("step-6: ")


def test_a_checkpoint_without_optimizer_state_resumes_with_fresh_moments(tiny_config, tmp_path):
    first = tiny_config(epochs=2, save_every=1, keep_checkpoints=2, out_dir=str(tmp_path / "a"))
    train(first)
    older = ckpt.checkpoint_dir(first.out_dir, 5)
    assert "optimizer" not in ckpt.load_state(older)
    sink = Recorder()

    summary = train(tiny_config(epochs=2, out_dir=str(tmp_path / "a"), resume_from=str(older)), sink=sink)

    assert summary["steps"] == 6
    assert any("AdamW's moments start afresh" in e["message"] for e in sink.of("event") if e["level"] == "warn")
