"""kill -9 of each process of the stack while it works: nothing a user started is lost.

supervisord (as `make run` runs it) starts each killed process again; the cases check
what the users see across the restart: the job trains every step exactly once and
its model answers, a dataset being validated is still validated, the periodic sweeps
go on, and a chat stream whose server died ends at once instead of hanging.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from llm.bundled import TINY_MODEL_ID

from ..live import (
    answers,
    chat_events,
    chat_lines,
    job_status,
    job_step,
    kill_program,
    metric_steps,
    program_pid,
    wait_finished,
    wait_healthy,
    wait_until,
)

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(420)]

EPOCHS = 3
"""Over alice_file's 40 examples at batch size 1: 120 optimizer steps."""


def sweeps_run(stack) -> int:
    """How many stale-job recovery sweeps the housekeeping worker has finished."""
    log = stack.log("worker-housekeeping")
    return sum(1 for line in log.splitlines() if "recover_stale_jobs" in line and "succeeded" in line)


def validations_taken(stack) -> int:
    log = stack.log("worker-default")
    return sum(1 for line in log.splitlines() if "validate_dataset[" in line and "received" in line)


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in found.split()]


def start_validation(stack, client) -> tuple[str, list[int]]:
    """Upload a file whose validation the default worker has taken but not begun; (its id, the held processes).

    The worker's pool processes are stopped (SIGSTOP), so the worker takes the message (prefetch)
    and hands it to a process that never runs it: killing the worker now loses the message with it.
    """
    held = children_of(program_pid(stack, "worker-default"))
    assert held, "the default worker runs a prefork pool"
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    taken = validations_taken(stack)
    uploaded = client.files.create(file=("small.jsonl", chat_lines(40, seed_word="green")), purpose="fine-tune")
    wait_until(lambda: validations_taken(stack) > taken, timeout=30, what="the default worker to take the validation")
    assert client.files.retrieve(uploaded.id).status == "uploaded"
    return uploaded.id, held


@pytest.mark.parametrize("program", ["web", "worker-default", "beat", "worker-train"])
def test_a_training_job_survives_kill_9_of(program, fault_stack, alice, alice_file):
    job = alice.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=alice_file.id,
        suffix=program.replace("-", ""),
        hyperparameters={"n_epochs": EPOCHS, "batch_size": 1, "save_every": 10},
    )
    total = EPOCHS * 40
    # Past the first checkpoint, so a killed training worker has one to resume from.
    wait_until(lambda: job_step(alice, job.id) >= 14, timeout=120, what="the job to pass its first checkpoint")
    validating, held = start_validation(fault_stack, alice) if program == "worker-default" else (None, [])
    sweeps_before = sweeps_run(fault_stack)

    training = job_status(alice, job.id)
    assert training.status == "running", f"the job must still train when {program} is killed: {training.status}"
    old_pid, new_pid = kill_program(fault_stack, program)
    for pid in held:  # the killed worker's pool processes go with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    done = wait_finished(alice, job.id, timeout=300)
    assert done.status == "succeeded", done.error
    steps = metric_steps(alice, job.id)
    assert sorted(steps) == list(range(1, total + 1)), f"each of the {total} steps once, got {sorted(steps)}"
    assert answers(alice, done.fine_tuned_model)
    assert program_pid(fault_stack, program) == new_pid != old_pid

    if program == "worker-train":
        notes = [e.message for e in alice.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "message"]
        assert any("stopped responding" in note for note in notes), notes
        assert any(note.startswith("Training started") and "from the checkpoint at step" in note for note in notes)
    if program == "worker-default":
        dataset = wait_until(
            lambda: (f := alice.files.retrieve(validating)).status in ("processed", "error") and f,
            timeout=120,
            what="the dataset whose validation was killed to be validated after all",
        )
        assert dataset.status == "processed", dataset
    if program == "beat":
        wait_until(lambda: sweeps_run(fault_stack) > sweeps_before + 1, timeout=60, what="sweeps after beat's restart")


class Stream(threading.Thread):
    """One streamed chat request read as server-sent events: pieces, finish_reason, error, when it ended."""

    def __init__(self, http: httpx.Client, body: dict):
        super().__init__(daemon=True)
        self.http, self.body = http, body
        self.pieces, self.finish_reason, self.error, self.ended_at = 0, None, None, None

    def run(self):
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=self.body, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for event in chat_events(response):
                    if "error" in event:
                        self.error = event["error"]
                    for choice in event.get("choices", []):
                        self.pieces += bool(choice["delta"].get("content"))
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()

    def wait_for_pieces(self, count: int) -> None:
        wait_until(lambda: self.pieces >= count or self.ended_at, timeout=60, interval=0.05, what="the stream")
        assert self.pieces >= count, f"the stream ended early: {self.error or self.finish_reason}"


def long_chat(model: str) -> dict:
    # Thousands of tokens: the tiny model takes several seconds, time enough to kill what serves it.
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "stream": True}


@pytest.fixture
def carol(fault_stack):
    key = fault_stack.api_key("carol")
    with httpx.Client(base_url=fault_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        yield http


def finishes(http: httpx.Client, model: str) -> None:
    """A short streamed chat that must end normally."""
    stream = Stream(http, {**long_chat(model), "max_tokens": 8})
    stream.run()
    assert stream.error is None and stream.finish_reason in ("stop", "length"), (stream.error, stream.finish_reason)


def test_a_stream_ends_at_once_when_its_deployment_instance_is_killed(fault_stack, carol):
    created = carol.post("/api/deployments", json={"model": TINY_MODEL_ID, "instances": 1})
    assert created.status_code == 200, created.text
    deployment = created.json()["id"]

    def running():
        body = carol.get(f"/api/deployments/{deployment}").json()
        return [i for i in body["instance_list"] if i["status"] == "running"]

    victim = wait_until(lambda: running(), timeout=120, what="the instance to run")[0]
    stream = Stream(carol, long_chat(TINY_MODEL_ID))
    stream.start()
    stream.wait_for_pieces(5)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    stream.join(timeout=30)

    assert stream.ended_at is not None, "the stream of a killed instance hung"
    assert stream.ended_at - killed_at < 15, f"the stream took {stream.ended_at - killed_at:.0f}s to end"
    assert stream.error is not None, f"a cut answer must say so, not end as {stream.finish_reason!r}"
    wait_until(lambda: [i for i in running() if i["id"] != victim["id"]], timeout=120, what="a replacement instance")
    finishes(carol, TINY_MODEL_ID)
    carol.delete(f"/api/deployments/{deployment}")


def test_a_stream_ends_at_once_when_the_web_server_is_killed(fault_stack, carol):
    finishes(carol, TINY_MODEL_ID)  # the shared pool, in the web process, has the model loaded
    stream = Stream(carol, long_chat(TINY_MODEL_ID))
    stream.start()
    stream.wait_for_pieces(5)
    web = program_pid(fault_stack, "web")
    os.kill(web, signal.SIGKILL)
    killed_at = time.monotonic()
    stream.join(timeout=30)

    assert stream.ended_at is not None, "the stream of a killed web server hung"
    assert stream.ended_at - killed_at < 15, f"the stream took {stream.ended_at - killed_at:.0f}s to end"
    assert stream.finish_reason not in ("stop", "length"), "a cut stream must not look finished"
    wait_until(lambda: (pid := program_pid(fault_stack, "web")) and pid != web, timeout=60, what="web to restart")
    wait_healthy(fault_stack)
    finishes(carol, TINY_MODEL_ID)
