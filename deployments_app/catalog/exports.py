"""Downloads of a model: its files as a zip streamed in constant memory, and the merged LoRA model."""

import io
import os
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings

from ..models import ModelCard
from .resolution import get_base_model

_CHUNK = 1024 * 1024
_ZIP64_FROM = 1024**3
# Weights barely compress; storing them keeps the download fast.
_STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


class _Sink(io.RawIOBase):
    """A write-only, unseekable file that hands out what was written so far."""

    def __init__(self):
        self._parts, self._position = [], 0

    def writable(self):
        return True

    def write(self, data):
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self):
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def zip_chunks(folder: Path, *, prefix: str, extra: dict[str, str] | None = None) -> Iterator[bytes]:
    """Yield a zip of every file under folder (plus extra text files), a megabyte at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w") as archive:
        for name, text in (extra or {}).items():
            archive.writestr(f"{prefix}/{name}", text, compress_type=zipfile.ZIP_DEFLATED)
            yield sink.take()
        # Our model card replaces the stub README peft writes.
        for path in sorted(
            p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in (extra or {})
        ):
            size = path.stat().st_size
            info = zipfile.ZipInfo.from_file(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
            info.compress_type = zipfile.ZIP_STORED if path.suffix in _STORED_SUFFIXES else zipfile.ZIP_DEFLATED
            with path.open("rb") as source, archive.open(info, "w", force_zip64=size >= _ZIP64_FROM) as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)
                    yield sink.take()
    yield sink.take()


async def as_async(chunks: Iterator[bytes]):
    """Serve a blocking generator under ASGI one chunk at a time (Django would buffer it all)."""
    take = sync_to_async(lambda: next(chunks, None), thread_sensitive=False)
    while (chunk := await take()) is not None:
        if chunk:
            yield chunk


def download_name(card: ModelCard, kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in card.model_id).strip("-")
    return f"{safe}-{kind}"


def model_readme(card: ModelCard, *, merged: bool) -> str:
    """A model card README in the Hugging Face style."""
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(card.hyperparameters.items()) if not isinstance(v, (dict, list)))
    metrics = "\n".join(f"| {k} | {v} |" for k, v in card.metrics.items() if v is not None)
    job = card.job
    data = (
        f"`{job.training_file_ref}`"
        + (f", validation `{job.validation_file_ref}`" if job and job.validation_file_ref else "")
        if job
        else "unknown"
    )
    what = (
        "the base model with the LoRA adapter merged into its weights (safetensors), with its tokenizer"
        if merged
        else ("a PEFT adapter: load it on top of the base model" if card.is_adapter else "the full fine-tuned model")
    )
    usage = (
        f'model = AutoModelForCausalLM.from_pretrained("{download_name(card, "merged")}")'
        if merged or not card.is_adapter
        else f'base = AutoModelForCausalLM.from_pretrained("<{card.base_model} folder>")\n'
        f'model = PeftModel.from_pretrained(base, "{download_name(card, "adapter")}")'
    )
    return f"""---
base_model: {card.base_model}
library_name: {"transformers" if merged or not card.is_adapter else "peft"}
tags: [fine-tuned, {card.method}]
---

# {card.model_id}

Fine-tuned from **{card.base_model}** with **{card.method}** by Finetune Console. This download holds {what}.

- Training data: {data}
- Created: {card.created_at:%Y-%m-%d %H:%M} UTC

## Hyperparameters

| name | value |
| --- | --- |
{hp or "| — | — |"}

## Metrics

| name | value |
| --- | --- |
{metrics or "| — | — |"}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{"from peft import PeftModel" if card.is_adapter and not merged else ""}
{usage}
```
"""


def export_dir(card: ModelCard) -> Path:
    """Where downloads built from this card (the merged model) are kept."""
    return settings.FT_ARTIFACTS_DIR / "exports" / str(card.pk)


def merged_folder(export_dir: Path) -> Path:
    return export_dir / "merged"


MERGE_STALE_SECONDS = 30 * 60
"""A merge whose folder has not changed for this long died with its worker: it may be asked for again."""


def merged_state(export_dir: Path) -> str:
    """ "ready", "building" or "absent" (also when a build was abandoned half-way)."""
    if (merged_folder(export_dir) / "config.json").exists():
        return "ready"
    try:
        touched = (export_dir / "merged.partial").stat().st_mtime
    except FileNotFoundError:
        return "absent"
    return "building" if time.time() - touched < MERGE_STALE_SECONDS else "absent"


def build_merged_model(card: ModelCard, export_dir: Path) -> Path:
    """Merge the card's LoRA adapter into its base and save weights, tokenizer and README.

    Each build writes into a folder of its own and renames it into place, so two builds of one
    card (a request repeated after a build looked abandoned) never write into each other: the
    first to finish stands, the other drops its copy. `merged.partial` only marks "building".
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.serve.pool import MODEL_LOADING

    base = get_base_model(card.base_model)
    if base is None or not card.is_adapter:
        raise ValueError(f"{card.model_id} is not a LoRA model of a known base")
    marker, final = export_dir / "merged.partial", merged_folder(export_dir)
    own = export_dir / f"merged.build-{os.getpid()}-{secrets.token_hex(4)}"
    marker.mkdir(parents=True, exist_ok=True)
    os.utime(marker)  # building, from now
    own.mkdir()
    try:
        with MODEL_LOADING:  # the worker's other thread may be loading a model too
            model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, card.path).merge_and_unload()
        merged.save_pretrained(own, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(base.path)).save_pretrained(own)
        (own / "README.md").write_text(model_readme(card, merged=True))
        if not (final / "config.json").exists():
            shutil.rmtree(final, ignore_errors=True)  # a half-removed leftover, not a build
        try:
            own.rename(final)
        except OSError:
            if not (final / "config.json").exists():
                raise
            shutil.rmtree(own)  # another build finished first: it stands
    except BaseException:
        shutil.rmtree(own, ignore_errors=True)
        raise
    shutil.rmtree(marker, ignore_errors=True)
    return final
