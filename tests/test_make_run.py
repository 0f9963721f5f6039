"""`make run` itself: starts everything, prints the URL and login, and stops it all on SIGTERM."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID

from .live import REPO, free_port

pytestmark = [pytest.mark.live, pytest.mark.timeout(400)]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_make_run_starts_the_stack_and_sigterm_stops_every_process(tmp_path, tiny_model_dir, bundled_model_dir, stack):
    """Runs beside the session's other stack: two instances with their own FT_HOME and FT_PORT."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / TINY_MODEL_ID).symlink_to(tiny_model_dir)
    (home / "models" / BUNDLED_MODEL_ID).symlink_to(bundled_model_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "FT_ADMIN_PASSWORD")}
    env.update(FT_HOME=str(home), FT_PORT=str(port))
    output = tmp_path / "make-run.log"
    with output.open("w") as log:
        make = subprocess.Popen(
            ["make", "run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while "Ready:" not in output.read_text() and time.monotonic() < deadline:
            assert make.poll() is None, output.read_text()
            time.sleep(1)
        text = output.read_text()
        assert f"http://127.0.0.1:{port}/" in text
        password = (home / "admin-password").read_text().strip()
        assert f"Admin login: admin / {password}" in text
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert processes_mentioning(str(home)), "no process runs with this FT_HOME"
        # The other instance is still healthy and is a different installation.
        assert httpx.get(stack.url + "/healthz", timeout=10).status_code == 200
        assert stack.port != port and stack.home != home
    finally:
        make.send_signal(signal.SIGTERM)  # to make alone, not its process group
        make.wait(timeout=90)
    deadline = time.monotonic() + 30
    while processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_mentioning(str(home)) == [], output.read_text()[-2000:]
