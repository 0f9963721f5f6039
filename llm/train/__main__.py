"""python -m llm.train train --model DIR --train-file F.jsonl --out DIR [options]

Metrics, evaluations and the summary go to stdout as JSON lines (the lines of
OUT/metrics.jsonl); events go to stderr. Config problems are printed one per
line and exit with status 2. Ctrl-C pauses: a checkpoint is saved, and
--resume-from continues from it.
"""

import argparse
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from .config import ConfigError, TrainConfig

_FLAG_OF = {"out_dir": "--out"}
_BOOLEAN = {"use_rslora"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = vars(parser.parse_args(argv))
    arguments.pop("command")
    config = TrainConfig(**{name: value for name, value in arguments.items() if value is not None or name in _BOOLEAN})
    problems = config.problems()
    if problems:
        return _fail(problems)

    from transformers.utils import logging as transformers_logging

    from .loop import train

    transformers_logging.disable_progress_bar()

    pause_requested: list[bool] = []

    def request_pause(*_: object) -> None:
        if pause_requested:
            raise KeyboardInterrupt
        pause_requested.append(True)
        print("[info] pausing after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request_pause)
    try:
        train(config, sink=_print, should_stop=lambda: "pause" if pause_requested else None)
    except ConfigError as error:
        return _fail(error.problems)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm.train")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("train", help="fine-tune a model on a chat JSONL file")
    for field in fields(TrainConfig):
        flag = _FLAG_OF.get(field.name, "--" + field.name.replace("_", "-"))
        if field.name in _BOOLEAN:
            command.add_argument(flag, dest=field.name, action="store_true")
            continue
        required = field.default is MISSING
        default = None if required else field.default
        command.add_argument(
            flag,
            dest=field.name,
            required=required,
            type=_typed(field.type),
            help="required" if required else f"default: {default}",
        )
    return parser


def _typed(annotation: object) -> Callable[[str], object]:
    """A converter that keeps a value it cannot convert, so TrainConfig.problems() reports it with the rest."""
    kinds: tuple[Callable[[str], object], ...] = (str,)
    if annotation is int:
        kinds = (int,)
    elif annotation is float:
        kinds = (int, float)  # "32" stays an int for a float field

    def convert(text: str) -> object:
        for kind in kinds:
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    return convert


def _print(kind: str, payload: dict[str, Any]) -> None:
    if kind == "event":
        print(f"[{payload['level']}] {payload['message']}", file=sys.stderr, flush=True)
    elif kind in ("metric", "eval", "summary"):
        print(json.dumps({"kind": kind, **payload}), flush=True)
    elif kind == "checkpoint":
        print(f"[info] checkpoint at step {payload['step']}: {payload['path']}", file=sys.stderr, flush=True)


def _fail(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
