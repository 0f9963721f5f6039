"""Big file copies (upload, split, dedupe) never hold SQLite's write lock: other writers go on meanwhile."""

import json
import os
import subprocess
import sys

from ..live import REPO


def test_another_writer_is_not_blocked_while_an_upload_a_split_and_a_dedupe_copy_their_files(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": "",  # the product's SQLite file under FT_HOME, with its settings
        "FT_HOME": str(tmp_path / "home"),
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: tasks run in the caller
        "DJANGO_SETTINGS_MODULE": "finetune_site.settings",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.datasets.slow_copy_writer"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert (result["upload"], result["split"], result["dedupe"]) == ("written", "written", "written"), result
    assert result["datasets"] == [
        ["train.dedup.jsonl", "processed", 20],
        ["train.jsonl", "processed", 20],
        ["train.train.jsonl", "processed", 15],
        ["train.validation.jsonl", "processed", 5],
    ]
