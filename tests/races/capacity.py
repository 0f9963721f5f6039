"""Two deployments created at the same moment against one free serving slot.

Run by tests/test_races.py in its own process, because the database (PostgreSQL,
from DATABASE_URL) is not the one the rest of the suite uses. Prints one JSON line.
"""

import json
import threading
import time

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from deployments_app import services, tasks  # noqa: E402
from deployments_app.models import Instance  # noqa: E402
from finetune_site.api_errors import ApiError  # noqa: E402

call_command("migrate", verbosity=0)
user = get_user_model().objects.create_user("racer", password="x")
tasks.run_instance.delay = lambda pk: None  # no worker here: only the rows matter

# Widen the window between counting the slots in use and adding to them, so that
# both requests are inside it together unless something serialises them.
counted = services._check_capacity


def slow_check(extra):
    counted(extra)
    time.sleep(1.0)


services._check_capacity = slow_check
start = threading.Barrier(2)
outcomes = []


def create():
    start.wait()
    try:
        services.deployment_create(user=user, model_id="race-base", instances=1)
        outcomes.append("created")
    except ApiError as exc:
        outcomes.append(exc.code)
    finally:
        connection.close()


threads = [threading.Thread(target=create) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"outcomes": sorted(outcomes), "instances": Instance.objects.count()}))
