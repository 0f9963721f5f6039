"""The real stack for end-to-end tests: exactly the supervisord config `make run` uses.

Each stack gets its own FT_HOME (so its own SQLite file and embedded Redis socket)
and port; base models are linked from the test cache instead of converted again.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(REPO / "manage.py")]
ADMIN_PASSWORD = "admin-e2e-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    home: Path
    port: int
    env: dict
    process: subprocess.Popen | None = None
    keys: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*MANAGE, *args], env=self.env, cwd=REPO, capture_output=True, text=True, check=check, timeout=300
        )

    def api_key(self, username: str) -> str:
        if username not in self.keys:
            out = self.manage("create_api_key", username, "--create-user").stdout
            self.keys[username] = out.strip().splitlines()[-1]
        return self.keys[username]

    def sdk(self, key: str, *, timeout: float = 120) -> openai.OpenAI:
        """The openai SDK on this stack's /v1, without retries: a test sees every answer as it came."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def rest(self, key: str) -> httpx.Client:
        """An HTTP client of this stack for the routes the SDKs lack (/api/deployments); close it (a with block)."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def supervisorctl(self, *args: str) -> str:
        ctl = Path(sys.executable).parent / "supervisorctl"
        config = self.home / "run" / "supervisord.conf"
        return subprocess.run([str(ctl), "-c", str(config), *args], capture_output=True, text=True, timeout=60).stdout

    def log(self, program: str) -> str:
        path = self.home / "logs" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_stack(
    home: Path, models: dict[str, Path], *, timeout: float = 180, keep_env: bool = False, env: dict | None = None
) -> Stack:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models").mkdir(exist_ok=True)
    for name, source in models.items():
        link = home / "models" / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    # keep_env passes REDIS_URL / DATABASE_URL through (scale-out tests); by default every part is embedded.
    dropped = ("DJANGO_SETTINGS_MODULE",) if keep_env else ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    port = free_port()
    env.update(
        FT_HOME=str(home),
        FT_PORT=str(port),
        FT_ADMIN_PASSWORD=ADMIN_PASSWORD,
        FT_HEARTBEAT_TIMEOUT="15",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    # Tests send chat requests back to back from one account; the rate limits have tests of their own.
    env.setdefault("FT_RATE_LIMIT_RPM", "0")
    # A succeeded job is evaluated on the evaluations worker; the live tests train many small jobs and
    # check other things, so by default they skip it (tests/evals covers it, and a stack may set it).
    env.setdefault("FT_AUTO_EVAL", "0")
    # Deployments on the embedded engine unless a test asks (a deployment's own `backend`, or this env).
    env["FT_SERVING_BACKEND"] = extra.get("FT_SERVING_BACKEND", "embedded")
    stack = Stack(home=home, port=port, env=env)
    stack.manage("runstack", "--skip-models", "--write-config-only")
    supervisord = Path(sys.executable).parent / "supervisord"
    stack.process = subprocess.Popen(
        [str(supervisord), "-n", "-c", str(home / "run" / "supervisord.conf")],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    last = None
    web = "web" in env.get("FT_ROLES", "web")
    while time.monotonic() < deadline:
        if not web:  # a machine without a web server: up once supervisord runs all its programs
            last = stack.supervisorctl("status")
            if last and all(" RUNNING " in line for line in last.strip().splitlines()):
                return stack
            time.sleep(1)
            continue
        try:
            last = httpx.get(stack.url + "/healthz", timeout=5)
            if last.status_code == 200:
                return stack
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{stack.log(p)[-3000:]}" for p in ("web", "worker-train", "worker-default", "redis"))
    stop_stack(stack)
    raise RuntimeError(f"stack did not become healthy: {last!r}\n{logs}")


def stop_stack(stack: Stack) -> None:
    if stack.process and stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.process.pid, signal.SIGKILL)
            stack.process.wait()


def wait_until(predicate, *, timeout: float = 120, interval: float = 0.5, what: str = "the condition"):
    """predicate()'s first truthy value; a predicate that raises counts as not yet (the stack may be restarting)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - a process of the stack may be down for a moment
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else "")
    )


def program_pid(stack: Stack, program: str) -> int | None:
    """The pid supervisord reports for a running program, None while it is down or starting again."""
    out = stack.supervisorctl("pid", program).strip()
    return int(out) if out.isdigit() and int(out) > 0 else None


def wait_healthy(stack: Stack, *, timeout: float = 120) -> None:
    wait_until(
        lambda: httpx.get(stack.url + "/healthz", timeout=5).status_code == 200, timeout=timeout, what="/healthz"
    )


def kill_program(stack: Stack, program: str, *, timeout: float = 120) -> tuple[int, int]:
    """kill -9 a program of the stack and wait until supervisord has started it again; (old pid, new pid)."""
    old = program_pid(stack, program)
    assert old, f"{program} is not running: {stack.supervisorctl('status')}"
    os.kill(old, signal.SIGKILL)
    new = wait_until(
        lambda: (
            (pid := program_pid(stack, program))
            and pid != old
            and "RUNNING" in stack.supervisorctl("status", program)
            and pid
        ),
        timeout=timeout,
        what=f"supervisord to start {program} again",
    )
    if program == "web":
        wait_healthy(stack, timeout=timeout)
    return old, new


def job_status(client, job_id: str):
    """The job, or None while the web server is down."""
    try:
        return client.fine_tuning.jobs.retrieve(job_id)
    except (openai.APIConnectionError, openai.InternalServerError, httpx.HTTPError):
        return None


def job_step(client, job_id: str) -> int:
    job = job_status(client, job_id)
    return ((job.model_extra or {}).get("progress") or {}).get("step", 0) if job else 0


def wait_finished(client, job_id: str, *, timeout: float = 240):
    return wait_until(
        lambda: (job := job_status(client, job_id)) and job.status in ("succeeded", "failed", "cancelled") and job,
        timeout=timeout,
        what=f"job {job_id} to finish",
    )


def metric_steps(client, job_id: str) -> list[int]:
    """The step of every training-loss point the job recorded, in the order the API lists them."""
    return [
        event.data["step"]
        for event in client.fine_tuning.jobs.list_events(job_id, limit=100)
        if event.type == "metrics" and event.data.get("train_loss") is not None
    ]


def answers(client, model: str) -> str:
    """A short greedy answer of model; asserts it produced at least one token."""
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the code for item 3?"}],
        max_tokens=5,
        temperature=0,
    )
    assert reply.usage.completion_tokens >= 1, reply
    return reply.choices[0].message.content


def chat_lines(n: int, *, seed_word: str = "blue") -> bytes:
    """n small chat examples, each a valid line."""
    import json

    lines = []
    for i in range(n):
        example = {
            "messages": [
                {"role": "system", "content": "You answer with the colour code."},
                {"role": "user", "content": f"What is the code for item {i}?"},
                {"role": "assistant", "content": f"The code for item {i} is {seed_word}-{i % 7}."},
            ]
        }
        lines.append(json.dumps(example))
    return ("\n".join(lines) + "\n").encode()


POSTGRES = "postgres://postgres@127.0.0.1:5432"


@contextmanager
def local_redis(settings, database: int):
    """settings.REDIS_URL pointed at the machine's Redis (127.0.0.1:6379), database `database`, empty before
    and after; the test is skipped without one. Yields a client of that database."""
    import pytest
    import redis

    url = f"redis://127.0.0.1:6379/{database}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis on 127.0.0.1:6379 is needed for this test")
    settings.REDIS_URL = url
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def postgres_up() -> bool:
    try:
        import psycopg

        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@contextmanager
def fresh_postgres_database(prefix: str):
    """The URL of a new, empty PostgreSQL database, dropped afterwards (PostgreSQL must be up)."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def login_cookies(stack) -> dict:
    with httpx.Client(base_url=stack.url) as http:
        http.get("/accounts/login/")
        token = http.cookies[f"ftcsrf-{stack.port}"]
        response = http.post(
            "/accounts/login/", data={"username": "admin", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": token}
        )
        assert response.status_code == 302
        return dict(http.cookies)


def chat_events(response):
    """The JSON events of a streamed chat completion's server-sent events, [DONE] left out."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


@contextmanager
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free local port; yields the environment a
    machine needs to reach it, as boto3 reads it: endpoint, credentials, region."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(endpoint, timeout=2), timeout=60, interval=0.2, what="moto's S3 server to answer")
        yield {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
