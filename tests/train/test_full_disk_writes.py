"""A disk that really fills: a small tmpfs holds the run's folder (root only; skipped, saying why, elsewhere).

torch and safetensors report a full disk as their own errors (RuntimeError, SafetensorError), not as
OSError: the run must still stop as DiskFull and leave no partial checkpoint. A metrics line cut short
by a full disk (or a killed process) must not stop the run from resuming.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from llm.train import checkpoint as ckpt
from llm.train import train

from .conftest import Recorder


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs; yields its path."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs was refused: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Write a file that leaves `leave` bytes free on disk."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_real_full_disk_during_the_checkpoint_write_stops_the_run_as_disk_full(tiny_config, small_disk, monkeypatch):
    config = tiny_config(out_dir=str(small_disk / "out"), epochs=2)  # checkpoints after step 3 and 6
    monkeypatch.setattr(ckpt, "FREE_SPACE_MARGIN_BYTES", 0)  # let the write start: the disk itself refuses it
    sizes: list[int] = []
    real_save = ckpt.save_weights

    def save_weights(model, tokenizer, folder, **kwargs):
        if sizes:  # the second checkpoint: fill the disk but for a fraction of what it needs
            fill(small_disk, leave=sizes[0] // 4)
        real_save(model, tokenizer, folder, **kwargs)
        sizes.append(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()))

    monkeypatch.setattr(ckpt, "save_weights", save_weights)

    with pytest.raises(ckpt.DiskFull) as full:
        train(config)

    assert "The disk filled while writing the checkpoint at step 6" in full.value.strerror
    assert ckpt.checkpoint_steps(config.out_dir) == [3]
    assert ckpt.damage(ckpt.checkpoint_dir(config.out_dir, 3)) is None
    assert not list((Path(config.out_dir) / "checkpoints").glob("*.partial*"))


def test_a_metrics_line_cut_short_does_not_stop_the_resume(tiny_config):
    first = tiny_config(epochs=2, keep_checkpoints=0)
    train(first)
    metrics = Path(first.out_dir) / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write('{"kind": "train", "st')  # the disk filled here, or the process was killed

    sink = Recorder()
    train(tiny_config(epochs=2, keep_checkpoints=0, resume_from=str(ckpt.checkpoint_dir(first.out_dir, 3))), sink=sink)

    lines = metrics.read_text().splitlines()
    assert all(line.endswith("}") for line in lines)
    assert [payload["step"] for payload in sink.of("metric")] == [4, 5, 6]
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
