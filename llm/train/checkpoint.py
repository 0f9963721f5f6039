"""Checkpoints: servable weights plus a plain dict of everything needed to continue the run.

OUT/checkpoints/step-N/
    adapter_config.json, adapter_model.safetensors   (LoRA/DoRA/QLoRA: PEFT format)
    or config.json, model.safetensors, tokenizer...  (full fine-tuning)
    training_state.pt                                 (the dict below, torch.save)

The state dict: step, epoch and index (the next example in that epoch's
order), tokens, train_seconds, elapsed_s, optimizer, rng, metrics, config.

A checkpoint is written to a temporary folder, flushed to disk (fsync) and
renamed, so a crash or a full disk never leaves a half-written one behind; a
save that would not fit in the free space, or that the caller's own limit
(`limit_room`: a storage quota per user) refuses, is refused before it starts.
Retention (`prune`) keeps the newest few checkpoints and the best one; only
the newest keeps the optimizer state, which for a full fine-tune is twice the
size of the weights. The others still deploy, and still resume, with fresh
optimizer moments.
"""

import errno
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import STATE_FILE
from .hf import TrainableModel, TrainTokenizer
from .modeling import save_weights

FREE_SPACE_MARGIN_BYTES = 256 * 2**20
"""Left free after a checkpoint: the database, the logs and other users' work share the disk."""
ALMOST_NO_SPACE_BYTES = 2**20
"""A write that failed with less than this left failed for want of room, whatever its error says."""
_STEP = re.compile(r"step-(\d+)")


class DiskFull(OSError):
    """A checkpoint does not fit: the run stops, its earlier checkpoints stay as they were."""


RoomCheck = Callable[[int], str | None]
"""Given a checkpoint's expected size in bytes, why it may not be written (a sentence), or None when it may."""
_room_checks: dict[Path, RoomCheck] = {}


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of room: by its errno, its words, or the free space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < ALMOST_NO_SPACE_BYTES
    except OSError:
        return False


def limit_room(out_dir: str | Path, check: RoomCheck | None) -> None:
    """Ask check before every checkpoint written under out_dir, beside the free-space check (None: stop asking).

    A refusal ends the run as a full disk does (DiskFull, earlier checkpoints kept): for
    limits the engine cannot see, such as a storage quota shared by a user's runs and files.
    """
    folder = Path(out_dir).resolve()
    if check is None:
        _room_checks.pop(folder, None)
    else:
        _room_checks[folder] = check


def room_check_of(out_dir: str | Path) -> RoomCheck | None:
    """The check limit_room registered for out_dir in this process, if any."""
    return _room_checks.get(Path(out_dir).resolve())


ROOM_ANSWER_SECONDS = 60.0
"""How long a rank waits for the launcher's answer before it writes anyway (the disk's own check still stands)."""


def room_check_through(path: Path) -> RoomCheck:
    """A RoomCheck for a training process whose real check lives in the process that launched it.

    The question (the expected bytes) goes to PATH.ask, the answer comes back in PATH.answer as
    {"refusal": ...}; the launcher answers with `answer_room_question`. Each file is written whole
    (renamed into place), so neither side reads half of one.
    """
    ask, answer = path.with_name(path.name + ".ask"), path.with_name(path.name + ".answer")

    def check(expected_bytes: int) -> str | None:
        answer.unlink(missing_ok=True)
        _write_whole(ask, str(expected_bytes))
        deadline = time.monotonic() + ROOM_ANSWER_SECONDS
        while time.monotonic() < deadline:
            try:
                text = answer.read_text()
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            answer.unlink(missing_ok=True)
            refusal = json.loads(text).get("refusal")
            return str(refusal) if refusal else None
        ask.unlink(missing_ok=True)
        return None

    return check


def answer_room_question(path: Path, check: RoomCheck) -> None:
    """If a training process asked (room_check_through), answer it with check's verdict."""
    ask = path.with_name(path.name + ".ask")
    try:
        expected_bytes = int(ask.read_text())
    except (FileNotFoundError, ValueError):
        return
    ask.unlink(missing_ok=True)
    _write_whole(path.with_name(path.name + ".answer"), json.dumps({"refusal": check(expected_bytes)}))


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir).resolve() / "checkpoints" / f"step-{step}"


def save_checkpoint(
    out_dir: str | Path,
    state: dict[str, Any],
    model: TrainableModel,
    tokenizer: TrainTokenizer,
    *,
    full: bool,
    expected_bytes: int = 0,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the weights and state of state["step"]; return the checkpoint folder.

    expected_bytes: how big it will be (the last checkpoint's size); raises DiskFull when
    that plus a margin is not free, and when the disk fills while writing. weights: the full
    state dict of a model sharded over several processes (FSDP2), gathered for this write.
    """
    final = checkpoint_dir(out_dir, state["step"])
    # Named for this process: a stalled run whose job was handed on must not delete the new run's write.
    partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    room_check = _room_checks.get(Path(out_dir).resolve())
    refusal = room_check(expected_bytes) if room_check else None
    if refusal:
        raise DiskFull(
            errno.EDQUOT,
            f"No room for the checkpoint at step {state['step']}: {refusal} Earlier checkpoints are kept; "
            "make room and retry the job to continue from the last one.",
        )
    partial.mkdir(parents=True)
    free = shutil.disk_usage(partial).free
    if expected_bytes and free < expected_bytes + FREE_SPACE_MARGIN_BYTES:
        shutil.rmtree(partial, ignore_errors=True)
        raise DiskFull(
            errno.ENOSPC,
            f"Not enough disk space for the checkpoint at step {state['step']}: it needs about "
            f"{_size(expected_bytes + FREE_SPACE_MARGIN_BYTES)} and {_size(free)} is free. Earlier checkpoints "
            "are kept; free some space and retry the job to continue from the last one.",
        )
    try:
        save_weights(model, tokenizer, partial, full=full, weights=weights)
        torch.save(state, partial / STATE_FILE)
        _sync_tree(partial)
    # torch and safetensors report a full disk as their own errors, not as OSError.
    except (OSError, RuntimeError, SafetensorError) as error:
        full = _out_of_space(error, final.parent)  # while the partial write still takes its room
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise DiskFull(
                errno.ENOSPC,
                f"The disk filled while writing the checkpoint at step {state['step']}; the partial write was "
                "removed and earlier checkpoints are kept. Free some space and retry the job.",
            ) from error
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _sync_directory(final.parent)
    return final


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    return state


def damage(checkpoint: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable state or weights), or None when it can."""
    folder = Path(checkpoint)
    try:
        state = load_state(folder)
        if not isinstance(state, dict) or "step" not in state:
            return f"{folder.name}: {STATE_FILE} holds no training state"
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            return f"{folder.name}: no weights file"
        for path in weights:
            with safe_open(str(path), framework="pt") as tensors:
                for name in tensors.keys():
                    tensors.get_tensor(name)
    # A torn or foreign file: whatever the readers raise means "do not resume from it".
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        return f"{folder.name}: {type(error).__name__}: {error}"
    return None


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    """Steps of the finished checkpoints in out_dir, oldest first."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for path in folder.iterdir() if (m := _STEP.fullmatch(path.name)))


def prune(out_dir: str | Path, *, keep_last: int, keep: set[int]) -> list[int]:
    """Remove checkpoints older than the newest keep_last unless their step is in keep; return the removed steps.

    The optimizer state stays only in the newest. keep_last 0 keeps every checkpoint.
    """
    steps = checkpoint_steps(out_dir)
    if not steps:
        return []
    removed = []
    if keep_last:
        for step in steps[:-keep_last]:
            if step not in keep:
                shutil.rmtree(checkpoint_dir(out_dir, step), ignore_errors=True)
                removed.append(step)
    for step in steps[:-1]:
        if step not in removed:
            _drop_optimizer_state(checkpoint_dir(out_dir, step))
    return removed


def folder_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _drop_optimizer_state(folder: Path) -> None:
    path = folder / STATE_FILE
    state = load_state(folder)
    if "optimizer" not in state:
        return
    del state["optimizer"]
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    _sync_file(partial)
    os.replace(partial, path)
    _sync_directory(folder)


def _sync_tree(folder: Path) -> None:
    paths = list(folder.rglob("*"))
    for path in paths:
        if path.is_file():
            _sync_file(path)
    for directory in [*(path for path in paths if path.is_dir()), folder]:
        _sync_directory(directory)


def _sync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GB" if count >= 2**30 else f"{count / 2**20:.0f} MB"


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
