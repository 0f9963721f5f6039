"""The real stack for end-to-end tests: exactly the supervisord config `make run` uses.

Each stack gets its own FT_HOME (so its own SQLite file and embedded Redis socket)
and port; base models are linked from the test cache instead of converted again.
"""

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

    def supervisorctl(self, *args: str) -> str:
        ctl = Path(sys.executable).parent / "supervisorctl"
        config = self.home / "run" / "supervisord.conf"
        return subprocess.run([str(ctl), "-c", str(config), *args], capture_output=True, text=True, timeout=60).stdout

    def log(self, program: str) -> str:
        path = self.home / "logs" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_stack(home: Path, models: dict[str, Path], *, timeout: float = 180, keep_env: bool = False) -> Stack:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models").mkdir(exist_ok=True)
    for name, source in models.items():
        link = home / "models" / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    # keep_env passes REDIS_URL / DATABASE_URL through (scale-out tests); by default every part is embedded.
    dropped = ("DJANGO_SETTINGS_MODULE",) if keep_env else ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    port = free_port()
    env.update(
        FT_HOME=str(home),
        FT_PORT=str(port),
        FT_ADMIN_PASSWORD=ADMIN_PASSWORD,
        FT_HEARTBEAT_TIMEOUT="15",
        PYTHONUNBUFFERED="1",
    )
    # Tests send chat requests back to back from one account; the rate limits have tests of their own.
    env.setdefault("FT_RATE_LIMIT_RPM", "0")
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
    while time.monotonic() < deadline:
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
