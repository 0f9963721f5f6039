"""Training over several processes from inside a program: torchrun as a child, rank 0's lines read back.

    summary = train_in_processes(config, processes=4, sink=sink, should_stop=should_stop)

behaves as train(config, sink, should_stop) does, for a caller (the training worker) that
must stay one process: it runs `torchrun -m llm.train train --all-json`, hands every JSON
line rank 0 prints to sink, and passes should_stop's answer on through the CLI's stop file.
Config problems found by the ranks come back as ConfigError, a checkpoint that did not fit
as DiskFull, anything else (a rank that died) as TrainingProcessesFailed. If the caller
stops waiting (an exception, a lost heartbeat), the whole process group is ended.

Over several machines, the caller's machine is node 0: it hosts the rendezvous (a static
one, so global rank 0 is always its own) and each other machine runs

    join_processes(config, processes=4, nnodes=2, node_rank=1, rendezvous="10.0.0.5:29400", ...)

whose ranks train their share silently: rank 0 reports, reads the stop file and writes. Machines
that never come fail node 0's run after join_timeout_s as MachinesDidNotJoin.
"""

import errno
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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
TORCH_JOIN_TIMEOUT_S = 600
"""How long node 0 waits for the other machines when the caller sets no join_timeout_s (torch's default)."""
KEEP_GOING_SECONDS = 2.0
"""How often a joining machine asks whether its run is still wanted (a database query in the worker)."""


class TrainingProcessesFailed(RuntimeError):
    """torchrun ended with a failure: a rank crashed or was killed, and the others were stopped."""


class MachinesDidNotJoin(TrainingProcessesFailed):
    """Node 0 waited join_timeout_s at the rendezvous and fewer machines than nnodes came."""

    def __init__(self, joined: int, nnodes: int, rendezvous: str, timeout_s: float) -> None:
        super().__init__(
            f"Only {joined} of {nnodes} machines joined the rendezvous at {rendezvous} within {timeout_s:g} s."
        )
        self.joined, self.nnodes = joined, nnodes


def split_rendezvous(rendezvous: str) -> tuple[str, int]:
    """(host, port) of "host:port" (an IPv6 host stays in brackets, as torchrun wants it); ValueError if it is not."""
    host, colon, port = rendezvous.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be host:port with a port from 1 to 65535, got {rendezvous!r}")
    return host, int(port)


def is_this_machine(host: str) -> bool:
    """Whether host is an address (or a name of one) of this machine: only there can node 0 host the rendezvous."""
    try:
        addresses = socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            try:
                probe.bind((address[0], 0, *address[2:]))  # the kernel refuses an address that is not ours
                return True
            except OSError:
                continue
    return False


def torchrun_command(
    config: TrainConfig,
    *,
    processes: int,
    nnodes: int = 1,
    rendezvous: str | None = None,
    node_rank: int | None = None,
    join_timeout_s: float | None = None,
    run_id: str = "ft",
    ask_room: bool = False,
) -> list[str]:
    """torchrun for `processes` ranks on this machine: alone (a free local port), or as one of nnodes
    machines meeting at rendezvous (host:port, c10d), which every machine's command names alike.

    With node_rank, the static rendezvous a launcher uses: node 0 hosts the store at rendezvous (an
    address of its own machine) and its first rank is global rank 0, the one that reports and writes.
    """
    if rendezvous and node_rank is not None:
        host, port = split_rendezvous(rendezvous)
        meeting = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static"]
        meeting += ["--master-addr", host, "--master-port", str(port), "--rdzv-id", run_id]
        if join_timeout_s is not None:  # the store's wait for the other machines (torch's default: 600 s)
            meeting += ["--rdzv-conf", f"timeout={max(1, round(join_timeout_s))}"]
    elif rendezvous:
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
    join_timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run config on `processes` ranks under torchrun; return rank 0's summary (as train() would).

    nnodes > 1: this machine is node 0 of a static rendezvous at its own address `rendezvous`, and
    the others must join it (join_processes) within join_timeout_s.
    """
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
        node_rank=0 if nnodes > 1 else None,
        join_timeout_s=join_timeout_s,
        run_id=run_id,
        ask_room=room_check is not None,
    )
    ranks = _Ranks.start(command, env)
    child = ranks.child
    summary: dict[str, Any] | None = None
    asked: str | None = None
    next_question = 0.0
    try:
        finished = False
        while not finished:
            line = ranks.next_line()
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
        returncode = ranks.wait()
    finally:
        if child.poll() is None:
            _end(child)
        stop_file.unlink(missing_ok=True)
    if returncode == 0 and summary is not None:
        return summary
    if nnodes > 1 and rendezvous and (joined := _machines_that_joined(ranks.errors)) is not None:
        raise MachinesDidNotJoin(joined, nnodes, rendezvous, join_timeout_s or TORCH_JOIN_TIMEOUT_S)
    raise _failure(returncode, list(ranks.errors))


def join_processes(
    config: TrainConfig,
    *,
    processes: int,
    nnodes: int,
    node_rank: int,
    rendezvous: str,
    run_id: str = "ft",
    join_timeout_s: float | None = None,
    keep_going: Callable[[], bool] | None = None,
    env: dict[str, str] | None = None,
) -> bool:
    """Run this machine's `processes` ranks as node node_rank (> 0) of the run node 0 hosts at rendezvous.

    Returns True when they ended with the run, False when keep_going() said no (the job moved on: the
    ranks were ended at once). Nothing they print is read as the run's news: global rank 0, on node 0,
    reports, reads the stop file and writes every checkpoint. A failure raises TrainingProcessesFailed;
    node 0 learns of it by itself, as its next collective fails.
    """
    config.check()
    keep_going = keep_going or (lambda: True)
    command = torchrun_command(
        config,
        processes=processes,
        nnodes=nnodes,
        rendezvous=rendezvous,
        node_rank=node_rank,
        join_timeout_s=join_timeout_s,
        run_id=run_id,
    )
    ranks = _Ranks.start(command, env)
    next_look = time.monotonic() + KEEP_GOING_SECONDS
    try:
        while ranks.next_line() is not None:
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + KEEP_GOING_SECONDS
                if not keep_going():
                    _end(ranks.child)
                    return False
        returncode = ranks.wait()
    finally:
        if ranks.child.poll() is None:
            _end(ranks.child)
    if returncode == 0:
        return True
    raise _failure(returncode, list(ranks.errors))


@dataclass
class _Ranks:
    """A running torchrun: its stdout lines in a queue (None once it closes), the tail of its stderr."""

    child: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    errors: deque[str]
    readers: list[threading.Thread]

    @classmethod
    def start(cls, command: list[str], env: dict[str, str] | None) -> "_Ranks":
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: ended as one, never leaving a rank behind
        )
        ranks = cls(child, queue.Queue(), deque(maxlen=200), [])
        ranks.readers = [
            threading.Thread(target=_read_into, args=(child.stdout, ranks.lines.put, True), daemon=True),
            threading.Thread(target=_read_into, args=(child.stderr, ranks.errors.append, False), daemon=True),
        ]
        for reader in ranks.readers:
            reader.start()
        return ranks

    def next_line(self) -> str | None:
        """The next stdout line, "" when none came within POLL_SECONDS, None once stdout closed."""
        try:
            return self.lines.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return ""

    def wait(self) -> int:
        returncode = self.child.wait()
        for reader in self.readers:
            reader.join(timeout=5)
        return returncode


_CLIENTS_JOINED = re.compile(r"waiting for clients\. (\d+)/\d+ clients joined")
"""How torch's TCPStore says, on node 0's stderr, that the other machines did not all come in time."""


def _machines_that_joined(stderr: deque[str]) -> int | None:
    """How many machines (node 0 included) met at the rendezvous before node 0 gave up; None: it did not time out."""
    for line in reversed(stderr):
        if found := _CLIENTS_JOINED.search(line):
            return int(found.group(1))
    return None


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
