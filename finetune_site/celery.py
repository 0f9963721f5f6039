import gc
import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "finetune_site.settings")

app = Celery("finetune_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
def _share_imports_with_forked_processes(**kwargs):
    # The prefork pool's processes share what the worker imported (Django, torch, transformers:
    # about 300 MB) copy-on-write, but the garbage collector writes to every object it scans,
    # which copies the page: each process then held about 110 MB of its own instead of 10 MB.
    gc.freeze()
