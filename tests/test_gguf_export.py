"""GGUF exports: the writer (llm.export) read back by transformers, the Ollama Modelfile, and the checked build
from Model Square with its progress, downloads and check shown on the card."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.export import read_vocabulary, tensor_count, write_gguf
from llm.export.gguf import permute_for_gguf
from llm.export.ollama import go_template, modelfile, turn_layout

from .test_model_square import BASE, alice, body_of, card, folders  # noqa: F401 - fixtures

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def load_gguf(folder: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_query_key_permutation_is_what_transformers_undoes_on_load():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8 * 2, 3)  # 4 heads of 4 rows
    stored = permute_for_gguf(weights, 4)
    assert not np.array_equal(stored, weights)
    back = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4}).process(
        stored, "blk.0.attn_q.weight"
    )
    assert np.array_equal(back.weights, weights)


@pytest.mark.parametrize("quant, atol", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_a_gguf_file_reads_back_in_transformers_with_the_same_logits_tokenizer_and_template(
    tiny_model_dir, tmp_path, quant, atol
):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    name = f"tiny-{quant}.gguf"
    write_gguf(
        tiny_model_dir,
        tmp_path / name,
        quant=quant,
        name="ft:tiny:alice:x",
        vocabulary=read_vocabulary(tiny_model_dir),
        progress=lambda done, total: seen.append((done, total)),
    )
    total = tensor_count(tiny_model_dir)
    assert seen == [(i, total) for i in range(1, total + 1)]

    fields = GGUFReader(str(tmp_path / name)).fields
    assert fields["general.name"].contents() == "ft:tiny:alice:x"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>: the end of an assistant turn
    assert fields["general.file_type"].contents() == (1 if quant == "f16" else 7)

    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    original_tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model, tokenizer = load_gguf(tmp_path, name)
    messages = [{"role": "user", "content": "Hello there, what is 12 + 30?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == original_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == original_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == 2
    got, expected = logits(model, ids), logits(original, ids)
    assert torch.allclose(got, expected, atol=atol), (got - expected).abs().max()


def test_a_model_of_another_architecture_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    import shutil

    from llm.export import GGUFExportError

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(model_type="qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError) as refused:
        write_gguf(
            tmp_path / "model", tmp_path / "m.gguf", quant="f16", name="m", vocabulary=read_vocabulary(tiny_model_dir)
        )
    assert "model_type is 'qwen2'" in str(refused.value) and "rope scaling 'yarn'" in str(refused.value)
    assert not (tmp_path / "m.gguf").exists()


def go_render(template: str, *, system: str, messages: list[dict]) -> str:
    """Ollama's rendering for the few actions our Modelfile templates use (if/else/range/ne, fields)."""
    parts = re.split(r"({{.*?}})", template)

    def run(at: int, scope: dict, out: list[str] | None) -> int:
        while at < len(parts):
            part, at = parts[at], at + 1
            if not part.startswith("{{"):
                if out is not None:
                    out.append(part)
                continue
            action = part[2:-2].strip()
            if action in ("end", "else"):
                return at - 1
            if action.startswith("if "):
                condition = action[3:]
                if condition.startswith("ne "):
                    field, value = condition[3:].split(" ", 1)
                    holds = scope.get(field.lstrip(".")) != json.loads(value)
                else:
                    holds = bool(scope.get(condition.lstrip(".")))
                at = run(at, scope, out if holds else None)
                if parts[at].strip("{} ") == "else":
                    at = run(at + 1, scope, None if holds else out)
                at += 1  # end
            elif action == "range .Messages":
                end = run(at, scope, None)  # where the body ends
                for message in scope["Messages"] if out is not None else []:
                    run(at, {**scope, "Role": message["role"], "Content": message["content"]}, out)
                at = end + 1
            elif out is not None:
                out.append(scope[action.lstrip(".")])
        return at

    out: list[str] = []
    run(0, {"System": system, "Messages": messages}, out)
    return "".join(out)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"},
        ],
    ],
)
def test_the_modelfile_template_writes_what_the_chat_template_writes(tiny_model_dir, messages):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    layout = turn_layout(tokenizer)
    assert layout is not None and layout.default_system == SYSTEM_PROMPT
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert go_render(go_template(layout), system=system, messages=messages) == expected


def test_the_modelfile_names_the_file_the_template_and_the_end_of_turn_stop(tiny_model_dir):
    from transformers import AutoTokenizer

    text = modelfile(
        "m-f16.gguf", tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)), stop_token="<|im_end|>"
    )
    assert text.startswith("FROM ./m-f16.gguf\n")
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


# --- the build from Model Square -------------------------------------------------------------------


@pytest.fixture
def run_tasks_now(monkeypatch):
    from deployments_app.catalog import services

    monkeypatch.setattr(
        "deployments_app.tasks.build_gguf_export.delay", lambda pk, quant: services.gguf_export(card_id=pk, quant=quant)
    )
    monkeypatch.setattr("deployments_app.tasks.build_merged_model.delay", lambda pk: services.model_merge(card_id=pk))


@pytest.fixture
def progress_seen(monkeypatch):
    """Every progress file the builder writes, read back from disk as the page reads it."""
    from deployments_app.catalog import exports, gguf_exports

    seen, write = [], exports.write_progress

    def recording(export_dir, kind, *args):
        write(export_dir, kind, *args)
        seen.append((kind, exports.read_progress(export_dir, kind)))

    monkeypatch.setattr(exports, "write_progress", recording)
    monkeypatch.setattr(gguf_exports, "write_progress", recording)
    monkeypatch.setattr("deployments_app.catalog.services.write_progress", recording)
    return seen


@pytest.mark.django_db
def test_gguf_builds_merge_write_check_and_offer_the_files_with_their_size(
    client, card, run_tasks_now, progress_seen, django_capture_on_commit_callbacks, monkeypatch
):
    from deployments_app.catalog import gguf_exports, services

    monkeypatch.setattr(gguf_exports, "PROBE_ANSWER_TOKENS", 6)  # a loaded CI machine; the agreement is the point
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/models/{card.model_id}/gguf/f16/").status_code == 302

    phases = [p["phase"] for kind, p in progress_seen if kind == "gguf-f16"]
    assert phases[0] == "waiting for a worker" and phases[1].startswith("merging")
    writing = [(p["done"], p["total"]) for kind, p in progress_seen if p["phase"] == "writing GGUF"]
    checking = [(p["done"], p["total"]) for kind, p in progress_seen if p["phase"] == "checking probes"]
    assert writing[-1][0] == writing[-1][1] > 1 and [d for d, _ in writing] == list(range(1, writing[-1][1] + 1))
    assert checking[-1] == (12, 12)  # 4 probes on the adapter, the merged model and the GGUF
    assert phases.index("writing GGUF") < phases.index("checking probes")

    folder = services.export_dir(card) / "gguf-f16"
    check = json.loads((folder / "check.json").read_text())
    assert check["agree"]["merged"] == [True] * 4 and check["agree"]["f16"] == [True] * 4 and check["all_agree"]
    assert not (services.export_dir(card) / "gguf-f16.partial").exists()

    page = client.get("/models/").content.decode()
    assert 'data-testid="gguf-f16"' in page and "4 of 4 probe answers agree" in page and "Build GGUF q8_0" in page
    assert 'hx-trigger="every 2s"' not in page  # nothing is building: no polling

    response = client.get(f"/models/{card.model_id}/download/f16.gguf")
    gguf_bytes = body_of(response)
    gguf_name = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    assert response.status_code == 200 and int(response["Content-Length"]) == len(gguf_bytes) > 1000
    assert (
        gguf_bytes == (folder / gguf_name).read_bytes() and f'filename="{gguf_name}"' in response["Content-Disposition"]
    )
    modelfile_text = body_of(client.get(f"/models/{card.model_id}/download/f16/Modelfile")).decode()
    assert f"FROM ./{gguf_name}" in modelfile_text and 'PARAMETER stop "<|im_end|>"' in modelfile_text

    # q8_0 starts from the merged model already built, and is checked the same way.
    progress_seen.clear()
    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/models/{card.model_id}/gguf/q8_0/")
    assert not any(p["phase"].startswith("merging") for _, p in progress_seen)
    check_file = services.export_dir(card) / "gguf-q8_0" / "check.json"
    check = json.loads(check_file.read_text())
    assert len(check["answers"]["q8_0"]) == 4 and check["agree"]["merged"] == [True] * 4

    # Whatever this random model did, a recorded difference is shown with its reason.
    check["answers"]["q8_0"][1] = "a different answer"
    check["agree"]["q8_0"][1], check["all_agree"] = False, False
    check_file.write_text(json.dumps(check))
    page = client.get("/models/").content.decode()
    assert "a different answer" in page and "q8_0 rounds every weight to 8 bits" in page
    assert f"{sum(check['agree']['q8_0'])} of 4 probe answers agree" in page


@pytest.mark.django_db
def test_while_a_build_runs_the_card_polls_its_progress(client, card):
    from deployments_app.catalog import exports, services

    folder = services.export_dir(card)
    exports.build_marker(folder, "gguf-f16").mkdir(parents=True)
    exports.write_progress(folder, "gguf-f16", "writing GGUF", 3, 21)
    exports.build_marker(folder, "merged").mkdir(parents=True)
    exports.write_progress(folder, "merged", "merging: writing the merged weights")

    page = client.get("/models/").content.decode()
    assert f'hx-get="/models/{card.model_id}/exports/"' in page and 'hx-trigger="every 2s"' in page
    assert "GGUF f16: writing GGUF 3/21" in page and "merged model: merging: writing the merged weights" in page
    partial = client.get(f"/models/{card.model_id}/exports/", HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith("<div") and "writing GGUF 3/21" in partial

    exports.write_progress(folder, "gguf-f16", "checking probes", 5, 12)
    assert "checking probes 5/12" in client.get(f"/models/{card.model_id}/exports/").content.decode()


@pytest.mark.django_db
def test_a_gguf_of_an_unknown_flavour_is_refused_naming_it(client, card):
    from deployments_app.catalog import services
    from finetune_site.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        services.gguf_export_request(card=card, quant="q2_k")
    assert refused.value.param == "quant"
    assert client.get(f"/models/{card.model_id}/download/q2_k.gguf").status_code == 404
    assert client.get(f"/models/{card.model_id}/download/f16.gguf").status_code == 302  # not built yet


@pytest.mark.django_db
def test_a_gguf_is_refused_while_the_merged_model_is_being_built(client, card, monkeypatch):
    from deployments_app import tasks
    from deployments_app.catalog import exports, gguf_exports, services

    queued = []
    monkeypatch.setattr(tasks.build_gguf_export, "delay", lambda *args: queued.append(args))
    exports.build_marker(services.export_dir(card), "merged").mkdir(parents=True)  # a merge in progress

    response = client.post(f"/models/{card.model_id}/gguf/f16/", follow=True)

    assert "The merged model of this card is being built; build the GGUF once it is ready." in response.content.decode()
    assert queued == [] and gguf_exports.gguf_state(services.export_dir(card), "f16") == "absent"


@pytest.mark.realmodel
def test_the_bundled_model_round_trips_through_gguf_f16(bundled_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_gguf(
        bundled_model_dir,
        tmp_path / "smollm2-f16.gguf",
        quant="f16",
        name="SmolLM2-135M-Instruct",
        vocabulary=read_vocabulary(bundled_model_dir),
    )
    model, tokenizer = load_gguf(tmp_path, "smollm2-f16.gguf")
    original = AutoModelForCausalLM.from_pretrained(str(bundled_model_dir), dtype=torch.float32).eval()
    text = AutoTokenizer.from_pretrained(str(bundled_model_dir)).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    got, expected = logits(model, ids), logits(original, ids)
    assert (got - expected).abs().max() < 0.05
    assert torch.equal(got[0, -1].argmax(), expected[0, -1].argmax())
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=12, do_sample=False)
        b = original.generate(ids, max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist()
