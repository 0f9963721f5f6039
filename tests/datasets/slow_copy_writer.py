"""Another writer while an upload, a split and a dedupe copy a file on a slow disk; prints one JSON line.

Run by tests/datasets/test_copies_outside_transactions.py in its own process, on the
product's own SQLite file (FT_HOME from the environment) with its settings: WAL,
transactions that start IMMEDIATE. A copy inside a transaction holds SQLite's one
write lock for the whole copy, and the other writer, here with a short busy timeout
as a heartbeat or an API call would have a long one, gives up with "database is locked".

    python -m tests.datasets.slow_copy_writer
"""

import json
import sqlite3
import threading
import time

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.files.storage import FileSystemStorage  # noqa: E402
from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import override_settings  # noqa: E402

from datasets_app import services  # noqa: E402
from datasets_app.models import Dataset  # noqa: E402
from finetune_site.celery import app  # noqa: E402

from .support import chat, jsonl  # noqa: E402

SLOW_SECONDS = 2.0
"""How long the slow disk takes to store one file."""
BUSY_TIMEOUT = 0.5
"""How long the other writer waits for the lock: well under SLOW_SECONDS."""


class SlowDisk(FileSystemStorage):
    """Local storage whose next file, once armed, takes SLOW_SECONDS to store (a big file, a slow disk)."""

    armed = threading.Event()
    copying = threading.Event()

    def _save(self, name, content):
        if SlowDisk.armed.is_set():
            SlowDisk.armed.clear()
            SlowDisk.copying.set()
            time.sleep(SLOW_SECONDS)
        return super()._save(name, content)


def other_writer(user_id: int) -> str:
    """What a heartbeat or an API call does: a short write from another connection."""
    db = sqlite3.connect(str(settings.DATABASES["default"]["NAME"]), timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE auth_user SET last_login = datetime('now') WHERE id = ?", (user_id,))
        db.execute("COMMIT")
        return "written"
    except sqlite3.OperationalError as exc:
        return f"refused: {exc}"
    finally:
        db.close()


def while_copying(action, user_id: int) -> str:
    """Run action in a thread; once its slow copy starts, write from another connection."""
    SlowDisk.copying.clear()
    SlowDisk.armed.set()

    def run():
        try:
            action()  # a failure shows in the datasets listed at the end, and its traceback on stderr
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    outcome = other_writer(user_id) if SlowDisk.copying.wait(20) else "the copy never started"
    worker.join()
    return outcome


def main() -> None:
    call_command("migrate", verbosity=0)
    app.conf.task_always_eager = True  # the worker's code runs in the thread that sends the task
    user = get_user_model().objects.create_user("copier", password="x")
    content = jsonl(*(chat(f"Question {i}?", f"Answer {i}.") for i in range(20)))
    result = {}
    with override_settings(STORAGES={**settings.STORAGES, "default": {"BACKEND": f"{__name__}.SlowDisk"}}):
        result["upload"] = while_copying(
            lambda: services.dataset_create(owner=user, upload=SimpleUploadedFile("train.jsonl", content)), user.pk
        )
        source = Dataset.objects.get(filename="train.jsonl")
        result["split"] = while_copying(
            lambda: services.dataset_split(dataset=source, validation_percent=25, seed=1), user.pk
        )
        result["dedupe"] = while_copying(lambda: services.dataset_dedupe(dataset=source), user.pk)
    result["datasets"] = sorted((d.filename, d.status, d.examples) for d in Dataset.objects.all())
    print(json.dumps(result))


main()
