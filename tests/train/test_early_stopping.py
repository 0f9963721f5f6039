"""Early stopping: finish (with the model saved) once validation stops improving."""

from pathlib import Path

from llm.train import train


def test_it_finishes_early_when_validation_loss_stops_improving(tiny_config, chat_files):
    _, validation = chat_files
    # A learning rate this small leaves the validation loss unchanged, so it never improves after the first.
    config = tiny_config(epochs=3, lr=1e-12, validation_file=str(validation), eval_every=1, early_stopping_patience=2)
    summary = train(config)
    assert summary["early_stopped"] is True and summary["stopped"] is None
    assert summary["steps"] == 3 and summary["total_steps"] == 9
    assert (Path(summary["output_dir"]) / "adapter_config.json").exists()


def test_it_runs_to_the_end_without_patience(tiny_config, chat_files):
    _, validation = chat_files
    summary = train(tiny_config(epochs=2, lr=1e-12, validation_file=str(validation), eval_every=1))
    assert summary["early_stopped"] is False and summary["steps"] == 6


def test_patience_needs_validation_data_and_eval_every(tiny_config):
    problems = tiny_config(early_stopping_patience=2).problems()
    assert any("needs a validation file" in p for p in problems)
    assert any("needs eval_every > 0" in p for p in problems)
