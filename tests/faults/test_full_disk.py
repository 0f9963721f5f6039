"""A disk that fills while a job checkpoints: the job fails saying so, nothing already saved is lost,
and everyone else's work goes on.

The jobs' folder of the fault stack becomes a small tmpfs (we are root in CI; skipped where
mounting is not allowed), then a file fills it after the job's first checkpoint, the way
another user's export or a runaway log would. The database, uploads and Redis stay on the
disk they were on, as they would on a machine whose artifacts live on their own volume.
"""

import errno
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from llm.bundled import TINY_MODEL_ID
from llm.train import checkpoint as ckpt

from ..live import answers, chat_lines, job_step, login_cookies, metric_steps, wait_finished, wait_until

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(900)]

TMPFS_MB = 300
"""Room for a few tiny checkpoints on top of the free-space margin a checkpoint must leave."""


@pytest.fixture
def small_jobs_disk(fault_stack):
    """FT_HOME/artifacts/jobs as a TMPFS_MB tmpfs, unmounted afterwards (earlier jobs' folders reappear)."""
    jobs = fault_stack.home / "artifacts" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(jobs)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root with CAP_SYS_ADMIN needed): {mounted.stderr.strip()}")
    try:
        yield jobs
    finally:
        subprocess.run(["umount", "--lazy", str(jobs)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no room left; the file."""
    filler = disk / "filler.bin"
    chunk = b"\0" * 2**20
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    assert shutil.disk_usage(disk).free < 2**20
    return filler


def test_a_full_disk_fails_the_job_clearly_keeps_its_checkpoints_and_others_go_on(fault_stack, small_jobs_disk, bob):
    admin = fault_stack.api_key("admin")
    http = httpx.Client(base_url=fault_stack.url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    client = openai.OpenAI(base_url=fault_stack.url + "/v1", api_key=admin, max_retries=0, timeout=60)
    uploaded = client.files.create(file=("disk.jsonl", chat_lines(40)), purpose="fine-tune")
    client.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID,
        training_file=uploaded.id,
        suffix="disk",
        hyperparameters={"n_epochs": 3, "batch_size": 1, "save_every": 10},
    )
    first = wait_until(
        lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=180, what="the first checkpoint"
    )[0]
    filler = fill(small_jobs_disk)
    assert job_step(client, job.id) < 120, "the job finished before the disk filled; make it longer"

    failed = wait_finished(client, job.id, timeout=180)
    assert failed.status == "failed", failed.status

    # Nothing already saved is lost: every listed checkpoint loads, and no half-written one is left taking space.
    job_dir = small_jobs_disk / job.id
    kept = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert first.step_number in {c.step_number for c in kept}
    for checkpoint in kept:
        assert ckpt.damage(ckpt.checkpoint_dir(job_dir, checkpoint.step_number)) is None
    assert not list((job_dir / "checkpoints").glob("*.partial-*"))

    # Another user's work goes on while the disk is full: uploads, validation, chat, the database.
    theirs = bob.files.create(file=("bob.jsonl", chat_lines(10, seed_word="red")), purpose="fine-tune")
    assert bob.files.wait_for_processing(theirs.id, poll_interval=0.5, max_wait_seconds=120).status == "processed"
    assert answers(bob, TINY_MODEL_ID)
    assert http.get("/v1/fine_tuning/jobs").status_code == 200

    # With space freed, a retry continues from the last checkpoint and trains each step once.
    filler.unlink()
    cookies = login_cookies(fault_stack)
    retried = httpx.post(
        f"{fault_stack.url}/jobs/{job.id}/retry/",
        cookies=cookies,
        headers={"X-CSRFToken": cookies[f"ftcsrf-{fault_stack.port}"]},
        timeout=60,
    )
    assert retried.status_code == 302, retried.text
    done = wait_finished(client, job.id, timeout=240)
    assert done.status == "succeeded", done.error
    notes = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "message"]
    assert any(n.startswith("Training started") and "from the checkpoint at step" in n for n in notes), notes
    assert sorted(metric_steps(client, job.id)) == list(range(1, 121))
    assert answers(client, done.fine_tuned_model)
    http.close()

    # Last, so that a wrong message does not hide whether anything was lost: the user is told the disk is full.
    assert failed.error.code == "disk_full", failed.error
    assert "disk" in failed.error.message.lower() and "Errno" not in failed.error.message, failed.error.message
