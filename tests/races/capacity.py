"""Two requests at the same moment against the serving slots: creates, or scales.

Run by tests/test_races.py in its own process, because the database (PostgreSQL,
from DATABASE_URL) is not the one the rest of the suite uses. Prints one JSON line.

    python -m tests.races.capacity create   two creates, one free slot: one must be refused
    python -m tests.races.capacity scale    two scales of one deployment from 1 to 2 of 2 slots: both fit
"""

import json
import sys
import threading
import time

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from deployments_app import tasks  # noqa: E402
from deployments_app.deployments import services  # noqa: E402
from deployments_app.models import Deployment, Instance  # noqa: E402
from finetune_site.errors import ApplicationError  # noqa: E402

mode = sys.argv[1]
call_command("migrate", verbosity=0)
user = get_user_model().objects.create_user("racer", password="x")
tasks.run_instance.delay = lambda pk: None  # no worker here: only the rows matter
if mode == "scale":
    deployment = services.deployment_create(user=user, model_id="race-base", instances=1)

# Widen the windows where a second request could slip in unless something serialises them:
# between counting the slots in use and adding to them (create), and between counting a
# deployment's own instances and checking the slots (scale).
checked = services._check_capacity


def slow_check(extra):
    if mode == "scale":
        time.sleep(1.0)
    checked(extra)
    if mode == "create":
        time.sleep(1.0)


services._check_capacity = slow_check
start = threading.Barrier(2)
outcomes = []


def request():
    start.wait()
    try:
        if mode == "create":
            services.deployment_create(user=user, model_id="race-base", instances=1)
        else:
            services.deployment_scale(deployment=Deployment.objects.get(pk=deployment.pk), instances=2)
        outcomes.append("done")
    except ApplicationError as exc:
        outcomes.append(exc.code)
    finally:
        connection.close()


threads = [threading.Thread(target=request) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"outcomes": sorted(outcomes), "instances": Instance.objects.count()}))
