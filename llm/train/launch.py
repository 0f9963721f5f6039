"""Training over several processes from inside a program: torchrun as a child, rank 0's lines read back.

    summary = train_in_processes(config, processes=4, sink=sink, should_stop=should_stop)

behaves as train(config, sink, should_stop) does, for a caller (the training worker) that
must stay one process: it runs `torchrun -m llm.train train --all-json`, hands every JSON
line rank 0 prints to sink, and passes should_stop's answer on through the CLI's stop file.
Config problems found by the ranks come back as ConfigError, a checkpoint that did not fit
as DiskFull, anything else (a rank that died) as TrainingProcessesFailed. If the caller
stops waiting (an exception, a lost heartbeat), the whole process group is ended.
"""

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .__main__ import DISK_FULL_PREFIX, command_line
from .checkpoint import DiskFull, answer_room_question, room_check_of
from .config import ConfigError, TrainConfig

if TYPE_CHECKING:  # the loop (transformers, peft) runs in the ranks, not in the process that launches them
    from .loop import ShouldStop, Sink

ROOM_FILE = "room"
"""In out_dir: where rank 0 asks this process's room check (limit_room) before each checkpoint."""
STOP_FILE = "stop-request"
"""In out_dir: what the launcher writes "pause" or "cancel" into; rank 0 reads it before every step."""
POLL_SECONDS = 0.5
GRACE_SECONDS = 30
"""After a stop signal, how long the ranks may take to exit before they are killed."""


class TrainingProcessesFailed(RuntimeError):
    """torchrun ended with a failure: a rank crashed or was killed, and the others were stopped."""


def torchrun_command(
    config: TrainConfig,
    *,
    processes: int,
    nnodes: int = 1,
    rendezvous: str | None = None,
    run_id: str = "ft",
    ask_room: bool = False,
) -> list[str]:
    """torchrun for `processes` ranks on this machine: alone (a free local port), or as one of nnodes
    machines meeting at rendezvous (host:port, c10d), which every machine's command names alike."""
    if rendezvous:
        meeting = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous]
        meeting += ["--rdzv-id", run_id]
    else:
        meeting = ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *meeting,
        "--nproc-per-node",
        str(processes),
        "-m",
        "llm.train",
        "train",
        *command_line(config),
        "--stop-file",
        str(Path(config.out_dir) / STOP_FILE),
        # Only when this process has a room check to answer with: unanswered, rank 0 would wait at each checkpoint.
        *(["--room-file", str(Path(config.out_dir) / ROOM_FILE)] if ask_room else []),
        "--all-json",
    ]


def train_in_processes(
    config: TrainConfig,
    *,
    processes: int,
    sink: "Sink | None" = None,
    should_stop: "ShouldStop | None" = None,
    nnodes: int = 1,
    rendezvous: str | None = None,
    run_id: str = "ft",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run config on `processes` ranks under torchrun; return rank 0's summary (as train() would)."""
    config.check()
    sink = sink or (lambda kind, payload: None)
    should_stop = should_stop or (lambda: None)
    stop_file = Path(config.out_dir) / STOP_FILE
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.unlink(missing_ok=True)
    room_check = room_check_of(config.out_dir)  # a storage quota the ranks cannot see themselves
    command = torchrun_command(
        config,
        processes=processes,
        nnodes=nnodes,
        rendezvous=rendezvous,
        run_id=run_id,
        ask_room=room_check is not None,
    )
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: ended as one, never leaving a rank behind
    )
    lines: queue.Queue[str | None] = queue.Queue()
    errors: deque[str] = deque(maxlen=200)
    readers = [
        threading.Thread(target=_read_into, args=(child.stdout, lines.put, True), daemon=True),
        threading.Thread(target=_read_into, args=(child.stderr, errors.append, False), daemon=True),
    ]
    for reader in readers:
        reader.start()
    summary: dict[str, Any] | None = None
    asked: str | None = None
    next_question = 0.0
    try:
        finished = False
        while not finished:
            try:
                line = lines.get(timeout=POLL_SECONDS)
            except queue.Empty:
                line = ""
            if room_check is not None:
                answer_room_question(Path(config.out_dir) / ROOM_FILE, room_check)
            if line is None:  # stdout closed: the ranks are gone
                finished = True
            elif line.startswith("{") and (record := _parsed(line)) is not None:
                kind, payload = record
                if kind == "summary":
                    summary = payload
                sink(kind, payload)
            if not finished and asked is None and time.monotonic() >= next_question:
                next_question = time.monotonic() + POLL_SECONDS
                answer = should_stop()
                if answer:
                    asked = "pause" if answer == "pause" else "cancel"
                    _write_atomically(stop_file, asked)
        returncode = child.wait()
        for reader in readers:
            reader.join(timeout=5)
    finally:
        if child.poll() is None:
            _end(child)
        stop_file.unlink(missing_ok=True)
    if returncode == 0 and summary is not None:
        return summary
    raise _failure(returncode, list(errors))


def _read_into(stream: Any, put: Callable[[Any], None], mark_the_end: bool) -> None:
    for line in stream:
        put(line.rstrip("\n"))
    if mark_the_end:
        put(None)


def _parsed(line: str) -> tuple[str, dict[str, Any]] | None:
    """A sink call rank 0 printed, or None for any other line (a library may print one starting with "{")."""
    try:
        record = json.loads(line)
        return str(record.pop("kind")), record
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _failure(returncode: int, stderr: list[str]) -> Exception:
    """What went wrong, as train() would have raised it, from what rank 0 said on stderr."""
    problems = [line.removeprefix("error: ") for line in stderr if line.startswith("error: ")]
    if problems:
        return ConfigError(problems)
    full = [line.removeprefix(DISK_FULL_PREFIX) for line in stderr if line.startswith(DISK_FULL_PREFIX)]
    if full:
        return DiskFull(errno.ENOSPC, full[0])
    tail = "\n".join(line for line in stderr[-30:] if line.strip())
    return TrainingProcessesFailed(f"torchrun exited with status {returncode}:\n{tail}")


def _write_atomically(path: Path, word: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(word + "\n")
    os.replace(partial, path)


def _end(child: subprocess.Popen[str]) -> None:
    """SIGTERM the whole group (torchrun passes it on to the ranks), SIGKILL what is left after the grace."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
