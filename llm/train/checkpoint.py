"""Checkpoints: servable weights plus a plain dict of everything needed to continue the run.

OUT/checkpoints/step-N/
    adapter_config.json, adapter_model.safetensors   (LoRA/DoRA/QLoRA: PEFT format)
    or config.json, model.safetensors, tokenizer...  (full fine-tuning)
    training_state.pt                                 (the dict below, torch.save)

The state dict: step, epoch and index (the next example in that epoch's
order), tokens, train_seconds, elapsed_s, optimizer, rng, metrics, config.
A checkpoint is written to a temporary folder and renamed, so a crash never
leaves a half-written one behind.
"""

import shutil
from pathlib import Path
from typing import Any

import torch

from .config import STATE_FILE
from .hf import TrainableModel, TrainTokenizer
from .modeling import save_weights


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir).resolve() / "checkpoints" / f"step-{step}"


def save_checkpoint(
    out_dir: str | Path, state: dict[str, Any], model: TrainableModel, tokenizer: TrainTokenizer, *, full: bool
) -> Path:
    """Write the weights and state of state["step"]; return the checkpoint folder."""
    final = checkpoint_dir(out_dir, state["step"])
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_weights(model, tokenizer, partial, full=full)
    torch.save(state, partial / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    return state


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
