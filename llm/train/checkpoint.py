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

import torch

from .config import STATE_FILE
from .modeling import save_weights


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir).resolve() / "checkpoints" / f"step-{step}"


def save_checkpoint(out_dir: str | Path, state: dict, model, tokenizer, *, full: bool) -> Path:
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


def load_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
