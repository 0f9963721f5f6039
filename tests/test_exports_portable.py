"""Portable exports: a downloaded adapter names its base by its public id and loads anywhere; no download
(adapter zip, merged zip, GGUF folder) names a path on this server; zips say their size."""

import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deployments_app.catalog import exports, gguf_exports, resolution, services
from llm.bundled import BUNDLED_HUB_ID, BUNDLED_MODEL_ID

from .test_model_square import BASE, alice, body_of, card, folders  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db
HUB_ID = "example-org/tiny-random-smollm2"
REPO = Path(__file__).resolve().parent.parent
PROMPT = "Tell me about the sea."

LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter, base_dir, prompt = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_dir)  # the base from a local folder, not from the hub
model = PeftModel.from_pretrained(base, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(base_dir)
text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
ids = tokenizer(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"base": PeftConfig.from_pretrained(adapter).base_model_name_or_path,
                  "tokens": out[0, ids.shape[1]:].tolist()}))
"""


@pytest.fixture
def tiny_has_a_hub_id(monkeypatch):
    """The tiny base registered with a public id, as the bundled base is (SmolLM2's adapters would need its weights)."""
    real = resolution.base_models
    monkeypatch.setattr(
        resolution, "base_models", lambda: [replace(b, hub_id=HUB_ID) if b.id == BASE else b for b in real()]
    )


def server_greedy_tokens(base_dir: Path, adapter: str) -> list[int]:
    """What this server's copy of the adapter answers greedily, on its base in our folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()


def download(client, url: str) -> tuple[bytes, int | None]:
    response = client.get(url)
    assert response.status_code == 200, url
    body = body_of(response) if response.streaming else response.content
    return body, int(response["Content-Length"]) if response.has_header("Content-Length") else None


def test_the_bundled_base_is_named_by_its_hub_id():
    assert (
        resolution.get_base_model(BUNDLED_MODEL_ID).public_id == BUNDLED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert resolution.get_base_model(BASE).public_id == BASE  # no public id: our name, never the folder


def test_a_downloaded_adapter_names_its_base_by_hub_id_and_loads_in_a_fresh_process(
    client, card, tiny_model_dir, tmp_path, tiny_has_a_hub_id
):
    from huggingface_hub import ModelCard

    body, length = download(client, f"/models/{card.model_id}/download/adapter.zip")
    assert length == len(body)  # the browser shows how far the download is
    zipfile.ZipFile(io.BytesIO(body)).extractall(tmp_path / "home")
    folder = next((tmp_path / "home").iterdir())

    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert json.loads((Path(card.path) / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir
    ), "the server's own copy keeps the folder it loads the base from"
    model_card = ModelCard.load(folder / "README.md")
    assert model_card.data.base_model == HUB_ID and model_card.data.library_name == "peft"
    assert "AutoPeftModelForCausalLM" in model_card.text and "PeftModel.from_pretrained(base" in model_card.text

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(folder), str(tiny_model_dir), PROMPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["base"] == HUB_ID
    assert answer["tokens"] == server_greedy_tokens(tiny_model_dir, card.path) and len(answer["tokens"]) > 0


def test_no_exported_file_names_a_path_of_this_server(
    client, card, settings, tiny_model_dir, tmp_path, tiny_has_a_hub_id, monkeypatch
):
    monkeypatch.setattr(gguf_exports, "PROBE_ANSWER_TOKENS", 2)
    services.model_merge(card_id=card.pk)
    gguf_exports.build_gguf(card, services.export_dir(card), "f16")

    files: dict[str, bytes] = {}
    for url in (f"/models/{card.model_id}/download/adapter.zip", f"/models/{card.model_id}/download/merged.zip"):
        body, length = download(client, url)
        assert length == len(body), url
        archive = zipfile.ZipFile(io.BytesIO(body))
        files.update({f"{url}:{name}": archive.read(name) for name in archive.namelist()})
    for path in (services.export_dir(card) / "gguf-f16").iterdir():
        files[f"gguf-f16/{path.name}"] = path.read_bytes()
    assert any(name.endswith(".gguf") for name in files) and any(name.endswith("Modelfile") for name in files)
    assert any(name.endswith("merged.zip:" + exports.download_name(card, "merged") + "/config.json") for name in files)

    server_paths = {
        str(settings.FT_HOME),
        str(settings.FT_ARTIFACTS_DIR),
        str(settings.FT_MODELS_DIR),
        str(tiny_model_dir),
        str(Path(card.path).parent),
        str(tmp_path),
        str(REPO),
    }
    for name, content in files.items():
        for server_path in server_paths:
            assert server_path.encode() not in content, f"{name} names {server_path}"
    merged_config = next(json.loads(c) for n, c in files.items() if n.endswith("merged/config.json"))
    assert str(merged_config.get("_name_or_path", "")) in ("", HUB_ID)
