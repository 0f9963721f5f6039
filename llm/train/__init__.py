"""The training engine: plain Python on torch, transformers and peft; no Django.

    from llm.train import TrainConfig, train
    summary = train(TrainConfig(model=..., train_file=..., out_dir=...), sink=print_sink)

or from a shell: python -m llm.train train --model DIR --train-file F --out DIR

Several processes: torchrun --nproc-per-node N -m llm.train train ... (llm.train.distributed),
or from a program that stays one process, llm.train.launch.train_in_processes(config, processes=N, ...).
"""

from typing import TYPE_CHECKING

from .config import ConfigError, TrainConfig
from .data import RenderedExample, render_example

if TYPE_CHECKING:  # loaded lazily by __getattr__ below
    from .loop import get_lr, train

__all__ = ["ConfigError", "RenderedExample", "TrainConfig", "get_lr", "render_example", "train"]


def __getattr__(name: str) -> object:
    # torch, transformers and peft load on first use: building or checking a config stays instant.
    if name in ("train", "get_lr"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
