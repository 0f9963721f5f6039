"""A bad config is refused before anything loads, with every problem named at once."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from llm.train import ConfigError, get_lr, train

REPO = Path(__file__).resolve().parents[2]


def test_it_lists_every_problem_at_once(tiny_config):
    config = tiny_config(
        train_file="/no/such/file.jsonl",
        method="prefix",
        epochs=0,
        batch_size=-1,
        lr=0,
        lora_r=0,
        lora_dropout=1.5,
        scheduler="step",
        loss_on="nothing",
        warmup_ratio=2.0,
    )

    problems = config.problems()

    fields = [problem.split(":")[0] for problem in problems]
    assert fields == [
        "train_file",
        "method",
        "loss_on",
        "scheduler",
        "epochs",
        "batch_size",
        "lr",
        "warmup_ratio",
        "lora_r",
        "lora_dropout",
    ]
    with pytest.raises(ConfigError) as raised:
        train(config)
    assert raised.value.problems == problems


def test_a_good_config_has_no_problems(tiny_config):
    assert tiny_config().problems() == []


def test_qlora_on_a_machine_without_cuda_is_a_clear_config_error(tiny_config):
    with pytest.raises(ConfigError) as raised:
        train(tiny_config(method="qlora"))

    assert any("qlora needs a CUDA GPU" in problem for problem in raised.value.problems)


def test_the_cli_prints_one_problem_a_line_and_exits_2(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm.train",
            "train",
            "--model",
            str(tiny_model_dir),
            "--train-file",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "two",
            "--lora-r",
            "0",
            "--scheduler",
            "step",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: train_file: {tmp_path / 'missing.jsonl'} does not exist",
        "error: scheduler: must be one of cosine, linear, constant, got 'step'",
        "error: epochs: must be a whole number >= 1, got 'two'",
        "error: lora_r: must be a whole number >= 1, got 0",
    ]
    assert not (tmp_path / "out").exists()


def lrs(scheduler, total=10, warmup=2, lr=1.0):
    return [get_lr(step, lr=lr, total_steps=total, warmup_steps=warmup, scheduler=scheduler) for step in range(total)]


def test_warmup_ramps_linearly_to_the_peak():
    assert lrs("cosine")[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_cosine_decays_from_the_peak_towards_zero():
    schedule = lrs("cosine")
    assert schedule[2] == 1.0
    assert schedule[6] == pytest.approx(0.5)
    assert all(later < earlier for earlier, later in itertools.pairwise(schedule[2:]))
    assert 0 < schedule[-1] < 0.05


def test_linear_decays_in_equal_steps():
    assert lrs("linear")[2:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_constant_stays_at_the_peak_after_warmup():
    assert lrs("constant")[2:] == [1.0] * 8


def test_no_warmup_starts_at_the_peak():
    assert lrs("cosine", warmup=0)[0] == 1.0
