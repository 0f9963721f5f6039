"""Training over two processes (torchrun, gloo on CPU) follows the one-process run step for step.

Each test starts torchrun as a subprocess on a free port, every rank on one thread. The
one-process run they compare against runs once, in this process, for the whole module.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm.train import ConfigError, TrainConfig, train
from llm.train import checkpoint as ckpt
from llm.train.launch import train_in_processes

from .conftest import Recorder, chat_examples, write_jsonl

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4
"""Per step, the issue's bound: the ranks sum the same terms in another order, nothing more."""
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """11 training conversations (batch 5: steps of 5, 5 and 1, so one rank sits out the last) and 3 to validate."""
    folder = tmp_path_factory.mktemp("data")
    return (
        write_jsonl(folder / "train.jsonl", chat_examples(11, seed=1)),
        write_jsonl(folder / "validation.jsonl", chat_examples(3, seed=2)),
    )


@pytest.fixture(scope="module")
def options(tiny_model_dir, data) -> dict:
    """Two epochs of three steps, validated every third step, every checkpoint kept."""
    train_file, validation_file = data
    return {
        "model": str(tiny_model_dir),
        "train_file": str(train_file),
        "validation_file": str(validation_file),
        "epochs": 2,
        "batch_size": 5,
        "lr": 1e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,  # dropout masks fall differently over two processes: no per-step match with it
        "warmup_ratio": 0.0,
        "eval_every": 3,
        "keep_checkpoints": 0,
        "micro_batch_tokens": 96,  # several micro-batches a step: accumulation is part of what must match
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def one_process(options, tmp_path_factory) -> Recorder:
    """The reference: the same run in this one process."""
    recorder = Recorder()
    out = tmp_path_factory.mktemp("one") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two ranks run; the per-test fixture that does this comes later
    try:
        train(TrainConfig(**options, out_dir=str(out)), sink=recorder)
    finally:
        torch.set_num_threads(threads)
    return recorder


def full_options(options: dict) -> dict:
    """One epoch of a full fine-tune: what FSDP2 shards."""
    return {**options, "method": "full", "lr": 1e-3, "epochs": 1}


def losses(metrics: list[dict]) -> dict[int, float]:
    return {metric["step"]: metric["loss"] for metric in metrics}


def grad_norms(metrics: list[dict]) -> list[float]:
    return [metric["grad_norm"] for metric in metrics]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun(*arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *arguments,
    ]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "FT_DIST_TIMEOUT_S": "60",  # a lost peer fails the run in a minute at worst, never hangs a test
        "PYTHONUNBUFFERED": "1",
    }


def cli_arguments(options: dict, out: Path) -> list[str]:
    arguments = []
    for name, value in options.items():
        arguments += ["--out" if name == "out_dir" else "--" + name.replace("_", "-"), str(value)]
    return [*arguments, "--out", str(out)]


def heard(records: Path, run: int, rank: int) -> list[dict]:
    path = records / f"calls-{run}-rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(options, tmp_path_factory) -> dict:
    """One torchrun of four runs: pause after step 4, resume it, a full fine-tune sharded by FSDP2,
    then a run whose rank 1 dies.

    One launch for all three: starting two processes that load torch is most of a run's time.
    """
    folder = tmp_path_factory.mktemp("launched")
    records = folder / "records"
    records.mkdir()
    paused = {**options, "out_dir": str(folder / "paused")}
    runs = [
        # In the second epoch: the data position matters. The copy keeps step 4's optimizer
        # state, which retention strips once the resumed run writes a newer checkpoint.
        {"config": paused, "pause_after": 4, "copy_to": str(folder / "alone")},
        {"config": {**paused, "resume_from": str(ckpt.checkpoint_dir(paused["out_dir"], 4))}},
        {"config": {**full_options(options), "out_dir": str(folder / "sharded")}, "env": {"FT_DIST_STRATEGY": "fsdp"}},
        {
            "config": {**options, "out_dir": str(folder / "killed"), "batch_size": 1, "eval_every": 0},
            "step_seconds": 0.05,  # hundreds of steps, slow enough that it is still going when rank 1 dies
            "dies": 1,
        },
    ]
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"records": str(records), "runs": runs}))
    result = subprocess.run(
        torchrun("-m", "tests.train.distributed_entry", str(spec)),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return {"result": result, "ended_at": time.time(), "folder": folder, "records": records, "paused": paused}


def test_two_processes_follow_the_one_process_curve(options, one_process, tmp_path):
    """Through the launcher the training worker uses: torchrun -m llm.train train, rank 0's lines read back."""
    out = tmp_path / "two"
    recorder = Recorder()

    summary = train_in_processes(
        TrainConfig(**options, out_dir=str(out)),
        processes=2,
        sink=recorder,
        should_stop=recorder.should_stop,
        env=environment(),
    )

    metrics = recorder.of("metric")
    expected = losses(one_process.of("metric"))
    # Rank 0 alone prints: each step once.
    assert [metric["step"] for metric in metrics] == [1, 2, 3, 4, 5, 6] == list(expected)
    assert losses(metrics) == pytest.approx(expected, abs=TOLERANCE)
    assert [metric["tokens"] for metric in metrics] == [metric["tokens"] for metric in one_process.of("metric")]
    # AdamW would hide gradients scaled by a constant; their norm does not.
    assert grad_norms(metrics) == pytest.approx(grad_norms(one_process.of("metric")), rel=1e-3)
    evals = recorder.of("eval")
    assert [e["eval_loss"] for e in evals] == pytest.approx(
        [e["eval_loss"] for e in one_process.of("eval")], abs=TOLERANCE
    )
    assert [e["eval_token_accuracy"] for e in evals] == pytest.approx(
        [e["eval_token_accuracy"] for e in one_process.of("eval")], abs=TOLERANCE
    )
    assert recorder.calls[-1] == ("summary", summary)
    assert summary["steps"] == 6 and summary["stopped"] is None
    assert summary["train_tokens"] == one_process.of("summary")[0]["train_tokens"]
    assert [payload["step"] for payload in recorder.of("checkpoint")] == [3, 6]
    assert any("2 processes (ddp)" in event["message"] for event in recorder.of("event"))
    assert recorder.stop_asked > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert ckpt.checkpoint_steps(out) == [3, 6]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert written == [{"kind": kind, **payload} for kind, payload in recorder.calls if kind in ("metric", "eval")]


def test_a_paused_two_process_run_resumes_on_two_or_on_one_process_and_ends_on_the_same_curve(launched, one_process):
    records, config = launched["records"], launched["paused"]
    expected = losses(one_process.of("metric"))
    paused, resumed = heard(records, 0, 0), heard(records, 1, 0)

    # Rank 1 answered "cancel" to every question and was not heard: rank 0 decides and reports.
    assert heard(records, 0, 1) == [] and heard(records, 1, 1) == []
    assert paused[-1]["kind"] == "summary" and paused[-1]["stopped"] == "pause" and paused[-1]["steps"] == 4
    assert [c["step"] for c in paused if c["kind"] == "checkpoint"] == [3, 4]
    assert losses([c for c in paused if c["kind"] == "metric"]) == pytest.approx(
        {step: expected[step] for step in (1, 2, 3, 4)}, abs=TOLERANCE
    )
    assert losses([c for c in resumed if c["kind"] == "metric"]) == pytest.approx(
        {5: expected[5], 6: expected[6]}, abs=TOLERANCE
    )
    assert resumed[-1]["kind"] == "summary" and resumed[-1]["steps"] == 6 and resumed[-1]["stopped"] is None
    state = ckpt.load_state(ckpt.checkpoint_dir(config["out_dir"], 4))
    assert state["world_size"] == 2 and len(state["rng_by_rank"]) == 2

    # The same two-process checkpoint, resumed by one process.
    alone = launched["folder"] / "alone"
    recorder = Recorder()
    train(
        TrainConfig(**{**config, "out_dir": str(alone), "resume_from": str(ckpt.checkpoint_dir(alone, 4))}),
        sink=recorder,
    )
    assert losses(recorder.of("metric")) == pytest.approx({5: expected[5], 6: expected[6]}, abs=TOLERANCE)


def test_a_rank_that_dies_fails_the_whole_run_at_once(launched):
    records = launched["records"]

    assert launched["result"].returncode != 0
    assert (records / "died-at").is_file(), launched["result"].stderr[-4000:]
    assert launched["ended_at"] - float((records / "died-at").read_text()) < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int((records / "pid-0").read_text()), 0)  # rank 0 did not stay behind, waiting
    reported = heard(records, 3, 0)
    assert any(call["kind"] == "metric" for call in reported)
    assert not any(call["kind"] == "summary" for call in reported)
    assert not (launched["folder"] / "killed" / "adapter").exists()


def test_a_full_fine_tune_sharded_by_fsdp2_follows_the_one_process_curve(launched, options, tmp_path):
    """FSDP2 is meant for GPUs (NCCL); on CPU with gloo the same code runs, and must add up the same."""
    alone = Recorder()
    train(TrainConfig(**full_options(options), out_dir=str(tmp_path / "alone")), sink=alone)

    sharded = heard(launched["records"], 2, 0)

    assert launched["result"].returncode != 0  # the last run's rank dies; this run ended before it
    assert sharded[-1]["kind"] == "summary" and sharded[-1]["steps"] == 3 and sharded[-1]["stopped"] is None
    assert losses([c for c in sharded if c["kind"] == "metric"]) == pytest.approx(
        losses(alone.of("metric")), abs=TOLERANCE
    )
    assert grad_norms([c for c in sharded if c["kind"] == "metric"]) == pytest.approx(
        grad_norms(alone.of("metric")), rel=1e-3
    )
    assert [c["eval_loss"] for c in sharded if c["kind"] == "eval"] == pytest.approx(
        [e["eval_loss"] for e in alone.of("eval")], abs=TOLERANCE
    )
    model = launched["folder"] / "sharded" / "model"
    assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    saved = load_file(model / "model.safetensors")
    expected = load_file(tmp_path / "alone" / "model" / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.allclose(saved[name], expected[name], atol=1e-4) for name in expected)


def test_the_cli_stops_when_its_stop_file_says_so_and_prints_every_sink_call(options, tmp_path, capsys):
    from llm.train.__main__ import main

    stop_file = tmp_path / "stop"
    stop_file.write_text("cancel\n")
    out = tmp_path / "out"

    assert main(["train", *cli_arguments(options, out), "--stop-file", str(stop_file), "--all-json"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "cancel" and summary["steps"] == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"kind": "event", "level": "info", "message": "Cancelled before step 1"} in printed
    assert printed[-1] == {"kind": "summary", **summary}


def test_the_launcher_says_what_the_ranks_reported_as_train_would_have_raised_it():
    from llm.train.launch import TrainingProcessesFailed, _failure

    bad_lines = _failure(1, ["[W] a warning", "error: train_file line 3: expected an object", "Traceback"])
    full = _failure(1, ["disk full: No room for the checkpoint at step 4"])
    crashed = _failure(-9, ["Signal 9 (SIGKILL) received by PID 123"])

    assert isinstance(bad_lines, ConfigError) and bad_lines.problems == ["train_file line 3: expected an object"]
    assert isinstance(full, ckpt.DiskFull) and full.strerror == "No room for the checkpoint at step 4"
    assert isinstance(crashed, TrainingProcessesFailed) and "SIGKILL" in str(crashed)


def test_machines_meet_at_the_rendezvous_a_lone_machine_at_a_free_port(options, tmp_path):
    from llm.train.launch import torchrun_command

    config = TrainConfig(**options, out_dir=str(tmp_path / "out"))

    alone = torchrun_command(config, processes=2)
    together = torchrun_command(config, processes=8, nnodes=2, rendezvous="10.0.0.5:29400", run_id="ftjob-1")

    assert "--standalone" in alone and "--rdzv-endpoint" not in alone
    assert together[together.index("--rdzv-endpoint") + 1] == "10.0.0.5:29400"
    assert together[together.index("--nnodes") + 1] == "2" and together[together.index("--rdzv-id") + 1] == "ftjob-1"
    assert together[together.index("--nproc-per-node") + 1] == "8"
    train_arguments = together[together.index("train") + 1 :]
    assert train_arguments[train_arguments.index("--out") + 1] == str(tmp_path / "out")
    assert train_arguments[-3:] == ["--stop-file", str(tmp_path / "out" / "stop-request"), "--all-json"]
