"""Training runs end to end on the tiny model: outputs load, sinks hear everything, runs stop and resume exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.train import train

from .conftest import Recorder, chat_examples, write_jsonl

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {
    "step",
    "total_steps",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_second",
    "elapsed_s",
    "eta_s",
    "token_accuracy",
}


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {}),
        ("lora", {"use_rslora": True, "target_modules": "q_proj,v_proj", "lora_dropout": 0.1}),
        ("dora", {}),
    ],
)
def test_adapter_methods_write_an_adapter_peft_loads(tiny_config, tiny_model_dir, method, options):
    config = tiny_config(method=method, **options)

    summary = train(config)

    adapter = Path(config.out_dir) / "adapter"
    assert summary["output_dir"] == str(adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (method == "dora")
    assert adapter_config["use_rslora"] is options.get("use_rslora", False)
    if "target_modules" in options:
        assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    assert not torch.allclose(logits_of(tuned, tokenizer), base_logits, atol=1e-4)


def test_full_fine_tuning_writes_a_model_and_tokenizer_that_load(tiny_config, tiny_model_dir):
    config = tiny_config(method="full", lr=1e-3)

    summary = train(config)

    model_dir = Path(config.out_dir) / "model"
    assert summary["trainable_params"] == summary["total_params"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits_of(tuned, tokenizer), logits_of(base, tokenizer), atol=1e-4)


def test_the_sink_hears_metrics_evals_checkpoints_and_the_summary(tiny_config, chat_files):
    _, validation_file = chat_files
    config = tiny_config(validation_file=str(validation_file), eval_every=2, epochs=2, save_every=2, keep_checkpoints=0)
    recorder = Recorder()

    summary = train(config, sink=recorder, should_stop=recorder.should_stop)

    metrics = recorder.of("metric")
    assert [metric["step"] for metric in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(set(metric) == METRIC_KEYS for metric in metrics)
    assert [metric["epoch"] for metric in metrics] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    assert metrics[-1]["tokens"] == summary["train_tokens"] > 0
    assert recorder.stop_asked == 6

    assert [payload["step"] for payload in recorder.of("eval")] == [2, 4, 6]
    assert set(recorder.of("eval")[0]) == {"step", "eval_loss", "eval_token_accuracy"}

    checkpoints = recorder.of("checkpoint")
    assert [payload["step"] for payload in checkpoints] == [2, 3, 4, 6]  # every 2 steps and every epoch end
    assert all(Path(payload["path"]).is_absolute() and Path(payload["path"]).is_dir() for payload in checkpoints)
    assert checkpoints[-1]["metrics"]["valid_loss"] == summary["eval_loss"]
    assert checkpoints[-1]["metrics"]["train_loss"] == summary["final_train_loss"]

    assert recorder.calls[-1] == ("summary", summary)
    assert summary["steps"] == 6 and summary["stopped"] is None
    assert summary["eval_loss"] == recorder.of("eval")[-1]["eval_loss"]
    levels = {payload["level"] for payload in recorder.of("event")}
    assert levels <= {"info", "warn", "error"}
    lines = [json.loads(line) for line in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == [
        "metric",
        "metric",
        "eval",
        "metric",
        "metric",
        "eval",
        "metric",
        "metric",
        "eval",
    ]


def test_the_same_seed_gives_the_same_losses(tiny_config):
    runs = []
    for _ in range(2):
        recorder = Recorder()
        train(tiny_config(lora_dropout=0.1), sink=recorder)
        runs.append([metric["loss"] for metric in recorder.of("metric")])

    assert runs[0] == runs[1]


def test_another_seed_gives_other_losses(tiny_config):
    runs = []
    for seed in (1, 2):
        recorder = Recorder()
        train(tiny_config(seed=seed), sink=recorder)
        runs.append([metric["loss"] for metric in recorder.of("metric")])

    assert runs[0] != runs[1]


@pytest.mark.parametrize("answer", ["cancel", True])
def test_cancel_stops_before_the_next_step_and_saves_nothing(tiny_config, answer):
    config = tiny_config(epochs=3)
    recorder = Recorder(stop_answers=[None, None, answer])

    summary = train(config, sink=recorder, should_stop=recorder.should_stop)

    assert summary["stopped"] == "cancel"
    assert summary["steps"] == 2
    assert len(recorder.of("metric")) == 2
    assert recorder.of("checkpoint") == []
    assert not (Path(config.out_dir) / "adapter").exists()
    assert not (Path(config.out_dir) / "checkpoints").exists()


def test_it_counts_and_reports_truncated_examples(tiny_config):
    recorder = Recorder(stop_answers=[None, "cancel"])

    summary = train(tiny_config(max_seq_len=40), sink=recorder, should_stop=recorder.should_stop)

    assert summary["truncated_examples"] > 0
    warnings = [payload["message"] for payload in recorder.of("event") if payload["level"] == "warn"]
    assert any(
        f"{summary['truncated_examples']} examples were longer than max_seq_len=40" in message for message in warnings
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_paused_and_resumed_run_ends_where_an_uninterrupted_one_does(tiny_config, tmp_path, method):
    options = {"method": method, "epochs": 2, "lora_dropout": 0.1}
    if method == "full":
        options["lr"] = 1e-3
    whole = Recorder()
    uninterrupted = train(tiny_config(out_dir=str(tmp_path / "whole"), **options), sink=whole)

    # Pause after step 4: in the middle of the second epoch, so the data position matters.
    paused = Recorder(stop_answers=[None] * 4 + ["pause"])
    config = tiny_config(out_dir=str(tmp_path / "paused"), **options)
    summary = train(config, sink=paused, should_stop=paused.should_stop)
    assert summary["stopped"] == "pause" and summary["steps"] == 4
    assert [kind for kind, _ in paused.calls if kind != "event"][-2:] == ["checkpoint", "summary"]
    assert paused.of("checkpoint")[-1]["step"] == 4
    assert not (tmp_path / "paused" / ("adapter" if method == "lora" else "model")).exists()

    resumed = Recorder()
    checkpoint = paused.of("checkpoint")[-1]["path"]
    final = train(tiny_config(out_dir=str(tmp_path / "paused"), resume_from=checkpoint, **options), sink=resumed)

    whole_losses = [metric["loss"] for metric in whole.of("metric")]
    assert [metric["step"] for metric in resumed.of("metric")] == [5, 6]
    assert [metric["loss"] for metric in resumed.of("metric")] == pytest.approx(whole_losses[4:], abs=1e-5)
    assert final["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], abs=1e-5)
    assert final["train_tokens"] == uninterrupted["train_tokens"]
    if method == "lora":
        weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "paused")]
        assert all(torch.allclose(weights[0][name], weights[1][name], atol=1e-6) for name in weights[0])
    steps = [json.loads(line)["step"] for line in (tmp_path / "paused" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_cli_trains_and_writes_every_output(tiny_model_dir, chat_files, tmp_path):
    train_file, validation_file = chat_files
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm.train",
            "train",
            "--model",
            str(tiny_model_dir),
            "--train-file",
            str(train_file),
            "--validation-file",
            str(validation_file),
            "--out",
            str(out),
            "--method",
            "lora",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--lr",
            "1e-2",
            "--lora-r",
            "4",
            "--scheduler",
            "linear",
            "--eval-every",
            "1",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-2" / "training_state.pt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["scheduler"] == "linear" and config["lora_r"] == 4 and config["device"] == "cpu"
    assert config["total_steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_loss"] is not None and summary["truncated_examples"] == 0
    stdout = [json.loads(line) for line in result.stdout.splitlines()]
    metrics_file = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stdout[:-1] == metrics_file
    assert [line["kind"] for line in stdout] == ["metric", "eval", "metric", "eval", "summary"]
    assert stdout[-1] == {"kind": "summary", **summary}


def test_a_cancel_is_heard_while_a_long_file_is_still_being_read(tiny_config, tmp_path):
    long_file = write_jsonl(tmp_path / "long.jsonl", chat_examples(600))
    recorder = Recorder(stop_answers=["cancel"])

    summary = train(tiny_config(train_file=str(long_file)), sink=recorder, should_stop=recorder.should_stop)

    assert recorder.stop_asked == 1  # asked at line 256, before the file was read to its end
    assert summary["stopped"] == "cancel" and summary["steps"] == 0
    assert not recorder.of("metric") and not recorder.of("checkpoint")
    assert recorder.calls[-1] == ("summary", summary)
