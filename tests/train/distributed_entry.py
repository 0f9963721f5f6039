"""What tests/train/test_distributed.py starts under torchrun: train() as a program calls it, on every rank.

    torchrun --nproc_per_node 2 -m tests.train.distributed_entry SPEC.json

SPEC holds {"records": DIR, "runs": [RUN, ...]}, the runs going one after another in the same
processes (a pause, then its resume), inside a process group this script starts, as a program
embedding the engine would. A RUN is {"config": {...}, "pause_after": k | null,
"step_seconds": s, "copy_to": DIR | null, "dies": rank | null, "env": {...}}:

- every rank writes its pid, and every sink call it hears, to DIR;
- rank 0's should_stop waits s seconds and pauses after k steps; every other rank's answers
  "cancel" at once: the run must follow rank 0 alone;
- copy_to: where rank 0 copies the run's out_dir when it ends (a later run's retention strips
  the optimizer state from older checkpoints);
- env: set in the environment for the run (FT_DIST_STRATEGY);
- dies: that rank kills itself (SIGKILL) once rank 0 has reported a step, after writing the
  time to DIR/died-at.
"""

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from llm.train import TrainConfig, train


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    records = Path(spec["records"])
    rank = int(os.environ["RANK"])
    (records / f"pid-{rank}").write_text(str(os.getpid()))
    dist.init_process_group("gloo")
    for number, run in enumerate(spec["runs"]):
        calls = records / f"calls-{number}-rank-{rank}.jsonl"
        calls.touch()
        before = dict(os.environ)
        os.environ.update(run.get("env", {}))
        if run.get("dies") == rank:
            threading.Thread(target=die_once_a_step_is_reported, args=(records, number), daemon=True).start()
        train(TrainConfig(**run["config"]), sink=recorder(calls), should_stop=stopper(run, rank))
        if rank == 0 and run.get("copy_to"):
            shutil.copytree(run["config"]["out_dir"], run["copy_to"])
        os.environ.clear()
        os.environ.update(before)
    dist.destroy_process_group()


def recorder(calls: Path):
    def sink(kind: str, payload: dict) -> None:
        with calls.open("a") as lines:
            lines.write(json.dumps({"kind": kind, **payload}, default=str) + "\n")

    return sink


def stopper(run: dict, rank: int):
    asked = [0]
    pause_after = run.get("pause_after")

    def should_stop() -> str | None:
        if rank != 0:
            return "cancel"
        time.sleep(run.get("step_seconds", 0))
        asked[0] += 1
        return "pause" if pause_after is not None and asked[0] > pause_after else None

    return should_stop


def die_once_a_step_is_reported(records: Path, number: int) -> None:
    reported = records / f"calls-{number}-rank-0.jsonl"
    while not reported.is_file() or '"metric"' not in reported.read_text():  # rank 0 may not have started it
        time.sleep(0.05)
    (records / "died-at").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1])
