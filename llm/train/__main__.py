"""python -m llm.train train --model DIR --train-file F.jsonl --out DIR [options]

Metrics, evaluations and the summary go to stdout as JSON lines (the lines of
OUT/metrics.jsonl); events go to stderr. Config problems are printed one per
line and exit with status 2. Ctrl-C pauses: a checkpoint is saved, and
--resume-from continues from it. --stop-file F is read before every step: a
file that says "pause" or "cancel" does that (how a supervising process asks).
--all-json prints every call of the engine's sink (events, checkpoints too) as a
JSON line on stdout, for a process that feeds them to its own sink.

Several processes: torchrun --nproc_per_node N -m llm.train train ... trains
each step's examples split over N processes; rank 0 alone prints and writes.
"""

import argparse
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig
from .distributed import is_main_process

DISK_FULL_PREFIX = "disk full: "
"""How the CLI names a checkpoint that did not fit, on stderr (a launcher raises DiskFull again)."""
_FLAG_OF = {"out_dir": "--out"}
_BOOLEAN = {"use_rslora"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = vars(parser.parse_args(argv))
    arguments.pop("command")
    stop_file = arguments.pop("stop_file")
    room_file = arguments.pop("room_file")
    sink = _print_json if arguments.pop("all_json") else _print
    config = TrainConfig(**{name: value for name, value in arguments.items() if value is not None or name in _BOOLEAN})
    problems = config.problems()
    if problems:
        return _fail(problems)

    from transformers.utils import logging as transformers_logging

    from .checkpoint import DiskFull, limit_room, room_check_through
    from .loop import train

    if room_file:  # the launcher's room check (a storage quota) answers before each checkpoint
        limit_room(config.out_dir, room_check_through(Path(room_file)))

    transformers_logging.disable_progress_bar()

    pause_requested: list[bool] = []

    def request_pause(*_: object) -> None:
        if pause_requested:
            raise KeyboardInterrupt
        pause_requested.append(True)
        if is_main_process():
            print("[info] pausing after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def should_stop() -> str | None:
        return "pause" if pause_requested else _read_stop_file(stop_file)

    signal.signal(signal.SIGINT, request_pause)
    try:
        train(config, sink=sink, should_stop=should_stop)
    except ConfigError as error:
        return _fail(error.problems)
    except DiskFull as error:
        if is_main_process():
            print(f"{DISK_FULL_PREFIX}{error.strerror}", file=sys.stderr, flush=True)
        return 3
    return 0


def command_line(config: TrainConfig) -> list[str]:
    """The arguments after `train` that make this config again (what a launcher passes on)."""
    arguments: list[str] = []
    for field in fields(TrainConfig):
        value = getattr(config, field.name)
        flag = _FLAG_OF.get(field.name, "--" + field.name.replace("_", "-"))
        if field.name in _BOOLEAN:
            arguments += [flag] if value else []
        elif value is not None:
            arguments += [flag, str(value)]
    return arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm.train")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("train", help="fine-tune a model on a chat JSONL file")
    command.add_argument(
        "--stop-file",
        dest="stop_file",
        default=None,
        help='read before every step: "pause" saves a checkpoint and stops, "cancel" stops',
    )
    command.add_argument(
        "--room-file",
        dest="room_file",
        default=None,
        help="before each checkpoint, ask the launching process for room through FILE.ask and FILE.answer",
    )
    command.add_argument(
        "--all-json",
        dest="all_json",
        action="store_true",
        help="print every sink call, events and checkpoints included, as a JSON line on stdout",
    )
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


def _print_json(kind: str, payload: dict[str, Any]) -> None:
    print(json.dumps({"kind": kind, **payload}), flush=True)


def _read_stop_file(path: str | None) -> str | None:
    """ "pause" or "cancel" when the file asks for it; a missing or empty file asks for nothing."""
    if path is None:
        return None
    try:
        word = Path(path).read_text(encoding="utf-8").strip().lower()
    except FileNotFoundError:
        return None
    return word if word in ("pause", "cancel") else None


def _fail(problems: list[str]) -> int:
    if is_main_process():  # every rank finds the same problems: say them once
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
