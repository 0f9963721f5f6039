"""Check-then-write races between concurrent requests, on PostgreSQL where they are real.

SQLite here starts every transaction IMMEDIATE, so it never lets two writers
interleave; PostgreSQL does, and there the product must serialise them itself.
"""

import json
import os
import subprocess
import sys

import pytest

from .live import REPO


@pytest.mark.parametrize(
    "mode, slots, expected",
    [
        # Two creates, one free slot: exactly one gets it.
        ("create", 1, {"outcomes": ["done", "insufficient_capacity"], "instances": 1}),
        # Two scales of one deployment from 1 to 2 instances with 2 slots: both fit, and 2 run, not 3.
        ("scale", 2, {"outcomes": ["done", "done"], "instances": 2}),
    ],
)
def test_concurrent_requests_never_overcommit_or_wrongly_refuse_serving_slots(
    database_url, tmp_path, mode, slots, expected
):
    base = tmp_path / "race-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "FT_HOME": str(tmp_path / "home"),
        "FT_SERVING_SLOTS": str(slots),
        "FT_BASE_MODELS": f"race-base={base}",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DJANGO_SETTINGS_MODULE": "finetune_site.settings",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.races.capacity", mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == expected, result
