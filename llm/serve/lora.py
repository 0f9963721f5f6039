"""LoRA adapters applied per batch row: rows of one base with different adapters (or none) share a forward pass.

peft keeps one active adapter for the whole model, so a batch mixing adapters
would need a pass per adapter. Here each targeted `nn.Linear` of the base is
wrapped once in a `RowLoraLinear` that holds every loaded adapter's A and B and
adds, to the base output, each adapter's low-rank update for exactly its rows: rows are
grouped by adapter, as S-LoRA and Punica do. Nothing model-wide says which
adapter is active; the engine says per forward pass which rows use which
adapter (`RowAdapters`, set with `rows_using`).

DoRA adapters are supported: their column norms depend only on the weights, so
each layer's magnitude scale is computed once when the adapter is loaded.
Adapters this cannot apply per row (embedding LoRA, modules_to_save, bias
training, per-module rank or alpha patterns) raise `NotPerRow`; the pool then
serves them as a merged model of their own.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_SUPPORTED_FALSY = (
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "alpha_pattern",
    "rank_pattern",
    "lora_bias",
    "fan_in_fan_out",
    "use_bdlora",
    "use_qalora",
    "alora_invocation_tokens",
)


class NotPerRow(Exception):
    """This adapter uses a feature that per-row application does not implement; the message says which."""


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter's update of one linear layer: y += scale * B(A(x)), or DoRA's rescaled form."""

    a: torch.Tensor
    """(rank, in_features)"""
    b: torch.Tensor
    """(out_features, rank)"""
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA only: magnitude / ||W + scale * B A|| per output feature, so y = m * (W x + scale * B A x) + bias."""


@dataclass(frozen=True)
class RowAdapters:
    """Which rows of the batch in this forward pass use which adapter id; rows absent use the base alone."""

    groups: tuple[tuple[int, torch.Tensor | slice], ...]
    """(adapter id, row index tensor, or slice(None) when every row uses that adapter)."""


_ROWS: ContextVar[RowAdapters | None] = ContextVar("row_adapters", default=None)


@contextmanager
def rows_using(adapters: RowAdapters | None) -> Iterator[None]:
    """Run the forward passes inside with this assignment of adapters to rows."""
    token = _ROWS.set(adapters)
    try:
        yield
    finally:
        _ROWS.reset(token)


def row_adapters(adapter_ids: list[int | None], device: torch.device) -> RowAdapters | None:
    """Group a batch's rows by adapter id (None: the base alone)."""
    wanted = {aid for aid in adapter_ids if aid is not None}
    if not wanted:
        return None
    if len(wanted) == 1 and None not in adapter_ids:
        return RowAdapters(((wanted.pop(), slice(None)),))
    groups = []
    for aid in sorted(wanted):
        rows = [row for row, other in enumerate(adapter_ids) if other == aid]
        groups.append((aid, torch.tensor(rows, dtype=torch.long, device=device)))
    return RowAdapters(tuple(groups))


class RowLoraLinear(nn.Module):
    """A base nn.Linear plus every loaded adapter's update for it, each applied to its own rows."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.updates: dict[int, LayerUpdate] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        adapters = _ROWS.get()
        if adapters is None or not self.updates:
            return y
        for aid, rows in adapters.groups:
            update = self.updates.get(aid)
            if update is None:
                continue
            xs = x[rows].to(update.a.dtype)
            delta = (functional.linear(functional.linear(xs, update.a), update.b) * update.scale).to(y.dtype)
            if update.magnitude is None:
                if isinstance(rows, slice):
                    y = y + delta
                else:
                    y = y.index_add(0, rows, delta)
            else:
                bias = self.base.bias if self.base.bias is not None else 0.0
                rescaled = update.magnitude * (y[rows] - bias + delta) + bias
                if isinstance(rows, slice):
                    y = rescaled
                else:
                    y = y.index_copy(0, rows, rescaled)
        return y


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from its folder: its updates by module path (as named in the base model)."""

    path: str
    layers: dict[str, LayerUpdate]


def read_adapter(folder: str | Path, model: nn.Module) -> AdapterWeights:
    """Read a peft LoRA/DoRA adapter saved for `model`; NotPerRow if it needs more than per-row updates."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise NotPerRow(f"peft_type {config.get('peft_type')} is not LoRA")
    if config.get("bias", "none") != "none":
        raise NotPerRow(f"bias {config['bias']!r} is trained")
    for key in _SUPPORTED_FALSY:
        if config.get(key):
            raise NotPerRow(f"{key} is set")
    state = _load_state(folder)
    alpha = float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora"))
    use_dora = bool(config.get("use_dora"))
    modules = dict(model.named_modules())
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            if name.endswith("." + suffix):
                grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            raise NotPerRow(f"the adapter holds {key}, which is not a LoRA A, B or DoRA magnitude")
    layers = {}
    for path, parts in grouped.items():
        target = modules.get(path)
        if isinstance(target, RowLoraLinear):
            target = target.base
        if not isinstance(target, nn.Linear):
            raise NotPerRow(f"{path} is not a linear layer of this model")
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise NotPerRow(f"{path} lacks its A or B matrix")
        weight = target.weight
        # On the CPU the small A and B products run in float32 whatever the weights: bfloat16 matrix
        # products this small cost several times more there (a fixed overhead per call).
        dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        a = parts["lora_A.weight"].to(weight.device, dtype)
        b = parts["lora_B.weight"].to(weight.device, dtype)
        rank = a.shape[0]
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        magnitude = None
        if use_dora:
            if "lora_magnitude_vector" not in parts:
                raise NotPerRow(f"{path} lacks its DoRA magnitude")
            with torch.no_grad():
                norm = torch.linalg.vector_norm(weight.float() + scale * (b.float() @ a.float()), dim=1)
                magnitude = (parts["lora_magnitude_vector"].float().to(weight.device) / norm).to(weight.dtype)
        layers[path] = LayerUpdate(a=a, b=b, scale=scale, magnitude=magnitude)
    if not layers:
        raise NotPerRow("the adapter holds no LoRA weights")
    return AdapterWeights(path=str(folder), layers=layers)


def install(model: nn.Module, adapter_id: int, weights: AdapterWeights) -> None:
    """Add an adapter's updates to the model under `adapter_id`, wrapping its target layers on first use."""
    modules = dict(model.named_modules())
    for path, update in weights.layers.items():
        layer = modules[path]
        if not isinstance(layer, RowLoraLinear):
            parent_path, _, attribute = path.rpartition(".")
            parent = modules[parent_path] if parent_path else model
            if not isinstance(layer, nn.Linear):
                raise NotPerRow(f"{path} is not a linear layer of this model")
            layer = RowLoraLinear(layer)
            setattr(parent, attribute, layer)
            modules[path] = layer
        layer.updates[adapter_id] = update


def uninstall(model: nn.Module, adapter_id: int) -> None:
    """Remove an adapter's updates (the wrappers stay: with no updates they cost one dict lookup)."""
    for module in model.modules():
        if isinstance(module, RowLoraLinear):
            module.updates.pop(adapter_id, None)


def _load_state(folder: Path) -> dict[str, Any]:
    safetensors_file = folder / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return dict(load_file(str(safetensors_file)))
    bin_file = folder / "adapter_model.bin"
    if bin_file.is_file():
        return dict(torch.load(bin_file, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {folder}")
