"""`manage.py serve_instance <instance_id>`: one deployment instance as one OS process.

The serving worker's task `run_instance` starts it and watches it, but it needs
only the database, Redis and the model files (the same FT_HOME/DATABASE_URL/
REDIS_URL settings), so it can also be run by hand or by another supervisor on
another machine. The instance's row must be `starting`: create the instance
(deploy or scale) and stop it with the API, not with this command.

SIGTERM or SIGINT stop it the way a worker shutdown does: requests already taken
are finished, the instance is marked dead so the reconciler replaces it, and the
process exits 0. FT_INSTANCE_THREADS sets torch's threads in the process.
"""

import signal
import socket

from django.conf import settings
from django.core.management.base import BaseCommand

from deployments_app.deployments import instance


class Command(BaseCommand):
    help = "Serve one deployment instance in this process until it is stopped (needs only DB, Redis, model files)."

    def add_arguments(self, parser):
        parser.add_argument("instance_id", type=int, help="The instance's database id (a starting instance).")
        parser.add_argument("--worker", default="", help="Where it runs, shown on the deployment page (default: host).")
        parser.add_argument("--parent-pid", type=int, default=None, help="Stop when this process is gone.")

    def handle(self, *args, instance_id, worker, parent_pid, **options):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: instance.stop_requested.set())
        instance.serve_instance(
            instance_id,
            worker=worker or socket.gethostname(),
            threads=settings.FT_INSTANCE_THREADS,
            parent_pid=parent_pid,
        )
