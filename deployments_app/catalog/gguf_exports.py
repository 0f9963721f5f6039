"""GGUF exports of a LoRA model (f16, q8_0) with an Ollama Modelfile, checked before they are offered.

A build merges the adapter first (unless the merged model is built already), writes
the GGUF file and its Modelfile, then runs the export check: a probe set answered
greedily by the adapter, the merged model and the GGUF read back by transformers.
Only then is the folder renamed into place, so "ready" means "checked". Each step
says where it is in a progress file the card polls.
"""

import json
import os
import secrets
import shutil
from pathlib import Path

from finetune_site.store import store
from llm.export import QUANTS, read_vocabulary, write_gguf
from llm.export.check import run_export_check
from llm.export.ollama import modelfile

from ..models import ModelCard
from .exports import (
    build_marker,
    build_merged_model,
    build_state,
    download_name,
    merged_folder,
    merged_state,
    model_readme,
    read_progress,
    write_progress,
)
from .resolution import get_base_model

CHECK_FILE = "check.json"
PROBE_ANSWER_TOKENS = 24
"""How long each greedy probe answer runs: long enough for answers to part ways, short enough to check in seconds."""


def gguf_kind(quant: str) -> str:
    return f"gguf-{quant}"


def gguf_folder(export_dir: Path, quant: str) -> Path:
    return export_dir / gguf_kind(quant)


def gguf_file_name(card: ModelCard, quant: str) -> str:
    return f"{download_name(card, quant)}.gguf"


def gguf_state(export_dir: Path, quant: str) -> str:
    """ "ready" once the file is written and checked, else "building" or "absent"."""
    return build_state(export_dir, gguf_kind(quant), ready=store().has(gguf_folder(export_dir, quant) / CHECK_FILE))


def gguf_exports(card: ModelCard, export_dir: Path) -> list[dict]:
    """What the card shows of each GGUF flavour: state, progress while building, file size and check when ready."""
    shown = []
    for quant in QUANTS:
        state, folder = gguf_state(export_dir, quant), gguf_folder(export_dir, quant)
        row = {"quant": quant, "state": state, "progress": None, "size": None, "check": None}
        if state == "building":
            row["progress"] = read_progress(export_dir, gguf_kind(quant))
        elif state == "ready":
            row["size"] = (folder / gguf_file_name(card, quant)).stat().st_size
            row["check"] = check_summary(json.loads((folder / CHECK_FILE).read_text()), quant)
        shown.append(row)
    return shown


def check_summary(check: dict, quant: str) -> dict:
    """The check as the card shows it: one row per probe, and why a q8_0 answer may differ."""
    rows = [
        {
            "prompt": prompt,
            "reference": check["answers"]["reference"][i],
            "answer": check["answers"][quant][i],
            "merged_agrees": check["agree"]["merged"][i],
            "agrees": check["agree"][quant][i],
        }
        for i, prompt in enumerate(check["prompts"])
    ]
    return {"rows": rows, "all_agree": check["all_agree"], "agreeing": sum(r["agrees"] for r in rows)}


def build_gguf(card: ModelCard, export_dir: Path, quant: str) -> Path:
    """Build, check and publish the card's GGUF export of this flavour; return its folder."""
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF flavour {quant!r}")
    kind, final = gguf_kind(quant), gguf_folder(export_dir, quant)
    marker = build_marker(export_dir, kind)
    marker.mkdir(parents=True, exist_ok=True)
    os.utime(marker)
    own = export_dir / f"{kind}.build-{os.getpid()}-{secrets.token_hex(4)}"
    own.mkdir()
    try:
        store().fetch(card.path)  # its check compares the GGUF model's answers with the adapter's
        if merged_state(export_dir) != "ready":
            build_merged_model(card, export_dir, kind=kind)
        merged = store().fetch(merged_folder(export_dir))
        _write_gguf_folder(card, merged, own, quant, progress=lambda *a: write_progress(export_dir, kind, *a))
        check = _check(card, merged, own, quant, progress=lambda *a: write_progress(export_dir, kind, *a))
        (own / CHECK_FILE).write_text(json.dumps(check, indent=2))
        if not (final / CHECK_FILE).exists():
            shutil.rmtree(final, ignore_errors=True)  # a half-removed leftover, not a build
        try:
            own.rename(final)
        except OSError:
            if not (final / CHECK_FILE).exists():
                raise
            shutil.rmtree(own)  # another build finished first: it stands
        store().publish(final)
    except BaseException:
        shutil.rmtree(own, ignore_errors=True)
        shutil.rmtree(marker, ignore_errors=True)  # not building any more: it may be asked for again
        raise
    shutil.rmtree(marker, ignore_errors=True)
    return final


def _write_gguf_folder(card: ModelCard, merged: Path, folder: Path, quant: str, *, progress) -> None:
    from transformers import AutoTokenizer

    name = gguf_file_name(card, quant)
    vocabulary = read_vocabulary(merged)
    write_gguf(
        merged,
        folder / name,
        quant=quant,
        name=card.model_id,
        vocabulary=vocabulary,
        progress=lambda done, total: progress("writing GGUF", done, total),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    stop = tokenizer.convert_ids_to_tokens(vocabulary.eos_id)
    (folder / "Modelfile").write_text(modelfile(name, tokenizer=tokenizer, stop_token=stop))
    (folder / "README.md").write_text(model_readme(card, merged=True, gguf=name))


def _check(card: ModelCard, merged: Path, folder: Path, quant: str, *, progress) -> dict:
    """Run the probe set on the adapter (the reference), the merged model and the new GGUF file."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.serve.pool import MODEL_LOADING

    base = get_base_model(card.base_model)
    name = gguf_file_name(card, quant)

    def adapter():
        with MODEL_LOADING:
            model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
            return PeftModel.from_pretrained(model, card.path).eval(), AutoTokenizer.from_pretrained(str(base.path))

    def merged_model():
        with MODEL_LOADING:
            model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
            return model.eval(), AutoTokenizer.from_pretrained(str(merged))

    def gguf_model():
        with MODEL_LOADING:
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
            return model.eval(), AutoTokenizer.from_pretrained(str(folder), gguf_file=name)

    return run_export_check(
        adapter,
        {"merged": merged_model, quant: gguf_model},
        max_new_tokens=PROBE_ANSWER_TOKENS,
        progress=lambda done, total: progress("checking probes", done, total),
    )
