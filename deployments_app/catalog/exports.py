"""Downloads of a model: its files as a zip streamed in constant memory, and the merged LoRA model.

Nothing exported names this server: an adapter's config and every model card name the
base by its public id (`BaseModel.public_id`), and builds write a small progress file
the Model Square card polls.
"""

import io
import json
import os
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings

from finetune_site.store import store

from ..models import ModelCard
from .resolution import get_base_model

_CHUNK = 1024 * 1024
_ZIP64_FROM = 1024**3


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
    """Yield a zip of every file under folder (plus extra text files, which replace files of the same name),
    a megabyte at a time.

    Every entry is stored, not deflated: weights barely compress, and a stored zip's size is
    known before it is written (`zip_size`), so the download can say how big it is.
    """
    sink = _Sink()
    with zipfile.ZipFile(sink, "w") as archive:
        for name, text in (extra or {}).items():
            archive.writestr(f"{prefix}/{name}", text, compress_type=zipfile.ZIP_STORED)
            yield sink.take()
        for path, arcname in _zip_members(folder, prefix=prefix, extra=extra):
            size = path.stat().st_size
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.compress_type = zipfile.ZIP_STORED
            with path.open("rb") as source, archive.open(info, "w", force_zip64=size >= _ZIP64_FROM) as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)
                    yield sink.take()
    yield sink.take()


def _zip_members(folder: Path, *, prefix: str, extra: dict[str, str] | None) -> list[tuple[Path, str]]:
    return [
        (p, f"{prefix}/{p.relative_to(folder).as_posix()}")
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (extra or {})
    ]


_LOCAL_HEADER, _DATA_DESCRIPTOR, _CENTRAL_HEADER, _END_RECORD = 30, 16, 46, 22


def zip_size(folder: Path, *, prefix: str, extra: dict[str, str] | None = None) -> int | None:
    """The exact length of zip_chunks' zip, or None where zip64 records make it depend on more than sizes.

    A stored entry streamed to an unseekable file is its local header, its bytes and a data
    descriptor; the central directory repeats each name. Nothing depends on the content.
    """
    entries = [(f"{prefix}/{name}", len(text.encode())) for name, text in (extra or {}).items()]
    entries += [(arcname, path.stat().st_size) for path, arcname in _zip_members(folder, prefix=prefix, extra=extra)]
    total = 0
    for name, size in entries:
        if size >= _ZIP64_FROM or size * 1.05 > zipfile.ZIP64_LIMIT:
            return None
        name_bytes = len(name.encode())
        total += _LOCAL_HEADER + name_bytes + size + _DATA_DESCRIPTOR + _CENTRAL_HEADER + name_bytes
    total += _END_RECORD
    if total > zipfile.ZIP64_LIMIT or len(entries) >= zipfile.ZIP_FILECOUNT_LIMIT:
        return None
    return total


def file_chunks(path: Path) -> Iterator[bytes]:
    """Yield a file's bytes a megabyte at a time."""
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            yield chunk


async def as_async(chunks: Iterator[bytes]):
    """Serve a blocking generator under ASGI one chunk at a time (Django would buffer it all)."""
    take = sync_to_async(lambda: next(chunks, None), thread_sensitive=False)
    while (chunk := await take()) is not None:
        if chunk:
            yield chunk


def download_name(card: ModelCard, kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in card.model_id).strip("-")
    return f"{safe}-{kind}"


def public_base_id(card: ModelCard) -> str:
    """The card's base as an export names it: its hub id where it has one."""
    base = get_base_model(card.base_model)
    return base.public_id if base is not None else card.base_model


def portable_adapter_config(card: ModelCard) -> str:
    """The adapter's adapter_config.json naming the base by its public id, not by its folder on this server.

    The server's own copy keeps the folder: the serving pool loads the adapter from it.
    """
    config = json.loads((Path(card.path) / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = public_base_id(card)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def adapter_download_extras(card: ModelCard) -> dict[str, str]:
    """The files the model download writes in place of the stored ones: our model card, the portable config."""
    extras = {"README.md": model_readme(card, merged=False)}
    if card.is_adapter and (Path(card.path) / "adapter_config.json").exists():
        extras["adapter_config.json"] = portable_adapter_config(card)
    return extras


def model_readme(card: ModelCard, *, merged: bool, gguf: str | None = None) -> str:
    """A model card (README.md with its metadata header), written through huggingface_hub.ModelCard.

    merged: the LoRA merged into the base; gguf: the GGUF file name when the card describes a GGUF export.
    """
    from huggingface_hub import ModelCard as HubModelCard
    from huggingface_hub import ModelCardData

    adapter = card.is_adapter and not merged and gguf is None
    base = public_base_id(card)
    tags = ["fine-tuned", card.method, "finetune-console"] + (["gguf", "ollama"] if gguf else [])
    data = ModelCardData(
        base_model=base,
        library_name="peft" if adapter else (None if gguf else "transformers"),
        pipeline_tag="text-generation",
        tags=tags,
    )
    body = _card_body(card, base=base, adapter=adapter, merged=merged, gguf=gguf)
    return str(HubModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _card_body(card: ModelCard, *, base: str, adapter: bool, merged: bool, gguf: str | None) -> str:
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(card.hyperparameters.items()) if not isinstance(v, (dict, list)))
    metrics = "\n".join(f"| {k} | {v} |" for k, v in card.metrics.items() if v is not None)
    job = card.job
    data = (
        f"`{job.training_file_ref}`"
        + (f", validation `{job.validation_file_ref}`" if job and job.validation_file_ref else "")
        if job
        else "unknown"
    )
    if gguf:
        what = f"the merged model as the GGUF file `{gguf}` for llama.cpp and Ollama, with its `Modelfile`"
    elif merged:
        what = "the base model with the LoRA adapter merged into its weights (safetensors), with its tokenizer"
    else:
        what = "a PEFT adapter: load it on top of the base model" if adapter else "the full fine-tuned model"
    return f"""# {card.model_id}

Fine-tuned from **{base}** with **{card.method}** by Finetune Console. This download holds {what}.

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

{_usage(card, base=base, adapter=adapter, gguf=gguf)}
"""


def _usage(card: ModelCard, *, base: str, adapter: bool, gguf: str | None) -> str:
    if gguf:
        name = download_name(card, "gguf").lower()
        return f"""With Ollama, in the folder holding `{gguf}` and `Modelfile`:

```sh
ollama create {name} -f Modelfile
ollama run {name}
```

With llama.cpp: `llama-cli -m {gguf} -cnv`. transformers reads it too:
`AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf}")`."""
    folder = download_name(card, "adapter" if adapter else "merged" if card.is_adapter else "model")
    if not adapter:
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```"""
    return f"""The adapter names its base as `{base}`; `AutoPeftModelForCausalLM` fetches it from the hub:

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
```

Offline, or with the base in a folder of your own, load the base from there and the adapter on top:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("path/to/{base.rsplit("/", 1)[-1]}")
model = PeftModel.from_pretrained(base, "{folder}")
tokenizer = AutoTokenizer.from_pretrained("path/to/{base.rsplit("/", 1)[-1]}")
```"""


def export_dir(card: ModelCard) -> Path:
    """Where downloads built from this card (the merged model, GGUF files) are kept."""
    return settings.FT_ARTIFACTS_DIR / "exports" / str(card.pk)


def merged_folder(export_dir: Path) -> Path:
    return export_dir / "merged"


MERGE_STALE_SECONDS = 30 * 60
"""A build whose marker has not changed for this long died with its worker: it may be asked for again."""


def build_marker(export_dir: Path, kind: str) -> Path:
    """The folder that says "building" for one kind of export ("merged", "gguf-f16"); it holds the progress file."""
    return export_dir / f"{kind}.partial"


def build_state(export_dir: Path, kind: str, *, ready: bool) -> str:
    """ "ready", "building" or "absent" (also when a build was abandoned half-way)."""
    if ready:
        return "ready"
    try:
        touched = build_marker(export_dir, kind).stat().st_mtime
    except FileNotFoundError:
        return "absent"
    return "building" if time.time() - touched < MERGE_STALE_SECONDS else "absent"


def merged_state(export_dir: Path) -> str:
    return build_state(export_dir, "merged", ready=store().has(merged_folder(export_dir) / "config.json"))


def write_progress(export_dir: Path, kind: str, phase: str, done: int = 0, total: int = 0) -> None:
    """Say where a build is (phase, done of total) in its marker folder, for the page to poll.

    Written beside and renamed over, so a reader never sees half a file; the rename also keeps
    the marker fresh, so a long build is never taken for an abandoned one.
    """
    marker = build_marker(export_dir, kind)
    own = marker / f"progress.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        own.write_text(json.dumps({"phase": phase, "done": done, "total": total, "at": time.time()}))
        own.replace(marker / "progress.json")
    except FileNotFoundError:
        pass  # no build is marked any more (another one finished, or the export was deleted): nobody reads it


def read_progress(export_dir: Path, kind: str) -> dict | None:
    try:
        return json.loads((build_marker(export_dir, kind) / "progress.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def build_merged_model(card: ModelCard, export_dir: Path, *, kind: str = "merged") -> Path:
    """Merge the card's LoRA adapter into its base and save weights, tokenizer and README.

    Each build writes into a folder of its own and renames it into place, so two builds of one
    card (a request repeated after a build looked abandoned) never write into each other: the
    first to finish stands, the other drops its copy. `merged.partial` only marks "building".
    kind: whose progress file hears about it (a GGUF build merges first).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.serve.pool import MODEL_LOADING

    base = get_base_model(card.base_model)
    if base is None or not card.is_adapter:
        raise ValueError(f"{card.model_id} is not a LoRA model of a known base")
    marker, final = build_marker(export_dir, "merged"), merged_folder(export_dir)
    own = export_dir / f"merged.build-{os.getpid()}-{secrets.token_hex(4)}"
    marker.mkdir(parents=True, exist_ok=True)
    os.utime(marker)  # building, from now
    own.mkdir()
    store().fetch(card.path)  # the adapter may have been trained on another machine

    def say(phase: str) -> None:
        for whose in {kind, "merged"}:  # a GGUF build's merge shows on the merged model's line too
            write_progress(export_dir, whose, phase)

    try:
        say("merging: loading the base model and the adapter")
        with MODEL_LOADING:  # the worker's other thread may be loading a model too
            model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, card.path).merge_and_unload()
        merged.config.name_or_path = base.public_id  # never our folder, should a transformers release save it
        say("merging: writing the merged weights")
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
        store().publish(final)  # before the marker goes: whoever sees "ready" finds it in the store
    except BaseException:
        shutil.rmtree(own, ignore_errors=True)
        raise
    shutil.rmtree(marker, ignore_errors=True)
    return final
