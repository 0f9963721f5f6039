"""Eight training workers claim one queued job at the same moment: exactly one may start it.

Run by tests/test_job_transitions.py in its own process, because the database
(PostgreSQL, from DATABASE_URL) is not the one the rest of the suite uses. Prints one JSON line.

    python -m tests.races.claim
"""

import json
import threading

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from jobs_app import transitions  # noqa: E402
from jobs_app.models import FineTuningJob  # noqa: E402

CLAIMERS = 8

call_command("migrate", verbosity=0)
user = get_user_model().objects.create_user("racer", password="x")
job = FineTuningJob.objects.create(owner=user, base_model="race-base", training_file_ref="file-race")
start = threading.Barrier(CLAIMERS)
winners = []


def claim(worker: str) -> None:
    # Each worker read the row while it was queued, as job_run does before claiming.
    mine = FineTuningJob.objects.get(pk=job.pk)
    start.wait()
    try:
        if transitions.start(mine, worker=worker):
            winners.append(worker)
    finally:
        connection.close()


threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(CLAIMERS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
row = FineTuningJob.objects.get(pk=job.pk)
print(json.dumps({"winners": winners, "status": row.status, "worker": row.worker, "attempts": row.attempts}))
