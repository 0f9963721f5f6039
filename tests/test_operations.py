"""Operations (issue 17, item 7): the access log, FT_HOST, `.env` files and compressed static files."""

import configparser
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import plotly
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient

from finetune_site.access_log import api_key_id
from finetune_site.env import env_host, load_env_files
from finetune_site.management.commands.runstack import Command, web_url
from finetune_site.models import ApiKey

from .live import REPO, wait_until

PLOTLY_URL = "/static/vendor/plotly/plotly.min.js"


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def access_lines():
    """The access log's lines as dicts, in order, for the requests the test makes."""

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(json.loads(record.getMessage()))

    handler = Collect()
    logger = logging.getLogger("finetune_site.access")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_it_logs_an_api_request_with_the_key_id_and_never_a_secret(client, settings, alice, access_lines):
    settings.FT_RATE_LIMIT_RPM = 0  # no Redis here to count in
    key, raw = ApiKey.issue(alice, name="ci")
    client.force_login(alice)  # a session cookie rides along too, and must not be logged either
    session_cookie = client.cookies[settings.SESSION_COOKIE_NAME].value

    response = client.get("/v1/fine_tuning/jobs?limit=7", HTTP_AUTHORIZATION=f"Bearer {raw}")

    assert response.status_code == 200
    [line] = access_lines
    assert line["method"] == "GET"
    assert line["route"] == "v1/fine_tuning/jobs"
    assert line["path"] == "/v1/fine_tuning/jobs"
    assert line["status"] == 200
    assert line["user"] == alice.pk
    assert line["key"] == key.key_id
    assert line["client"] == "127.0.0.1"
    assert 0 < line["duration_ms"] < 10_000
    assert "streaming" not in line
    text = json.dumps(line)
    secret = raw.split(".", 1)[1]
    for never in (secret, session_cookie, "limit", "Bearer"):
        assert never not in text


def test_it_logs_a_404_as_anonymous_without_a_route(client, access_lines, db):
    assert client.get("/no/such/page").status_code == 404

    [line] = access_lines
    assert (line["status"], line["route"], line["path"]) == (404, None, "/no/such/page")
    assert (line["user"], line["key"]) == ("anonymous", None)


def test_it_logs_a_page_served_through_the_async_handler(alice, access_lines):
    """uvicorn runs the ASGI handler, where the middleware must neither block nor query for the user."""
    client = AsyncClient()
    async_to_sync(client.aforce_login)(alice)

    response = async_to_sync(client.get)("/")

    assert response.status_code == 200
    [line] = access_lines
    assert (line["route"], line["path"], line["status"], line["user"]) == ("", "/", 200, alice.pk)


def test_it_reads_a_key_id_only_from_something_shaped_like_a_key():
    assert api_key_id("Bearer ftk0123456789abcdef.s3cr3t") == "ftk0123456789abcdef"
    assert api_key_id("ftk0123456789abcdef.s3cr3t") == "ftk0123456789abcdef"
    # A zhipuai token names its key in the api_key claim.
    token = jwt.encode({"api_key": "ftkfeedfacefeedface", "exp": 1}, "whatever-secret-value", algorithm="HS256")
    assert api_key_id(f"Bearer {token}") == "ftkfeedfacefeedface"
    # Without a `<key_id>.` prefix the whole token may be a secret: nothing is read from it.
    assert api_key_id("Bearer sk-live-0123456789") is None
    assert api_key_id("") is None
    assert api_key_id("Bearer a b c.d") is None


def test_ft_host_reaches_the_web_servers_command_and_the_printed_url(settings, tmp_path):
    settings.FT_HOST = "0.0.0.0"
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(Command()._write_config(tmp_path, tmp_path).read_text())

    assert f"--host 0.0.0.0 --port {settings.FT_PORT}" in config["program:web"]["command"]
    assert web_url("0.0.0.0", 8123) == "http://127.0.0.1:8123/"
    assert web_url("192.168.1.20", 8123) == "http://192.168.1.20:8123/"
    assert web_url("::1", 8123) == "http://[::1]:8123/"


def test_ft_host_must_be_an_address_or_a_host_name(monkeypatch):
    monkeypatch.setenv("FT_HOST", "console.example.org")
    assert env_host("FT_HOST", "127.0.0.1") == "console.example.org"
    monkeypatch.setenv("FT_HOST", "http://0.0.0.0")
    with pytest.raises(ImproperlyConfigured, match="FT_HOST"):
        env_host("FT_HOST", "127.0.0.1")


def test_it_reads_the_env_file_in_ft_home_and_the_real_environment_wins(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text("FT_MAX_BATCH=7\nFT_PORT=8123\nFT_HOST=10.1.2.3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FT_", "DJANGO_"))}
    env.update(FT_HOME=str(home), FT_PORT="9000")
    script = "from finetune_site import settings as s; print(s.FT_MAX_BATCH, s.FT_PORT, s.FT_HOST, s.ALLOWED_HOSTS[-1])"

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "9000", "10.1.2.3", "10.1.2.3"]


def test_ft_homes_env_file_wins_over_the_repositorys(tmp_path):
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir(), home.mkdir()
    (repo / ".env").write_text("A=repo\nB=repo\nC=repo\nFT_HOME=/elsewhere\n")
    (home / ".env").write_text("B=home\nC=home\n")
    environ = {"FT_HOME": str(home), "C": "real"}

    load_env_files(repo, environ)

    assert environ == {"FT_HOME": str(home), "A": "repo", "B": "home", "C": "real"}


@pytest.mark.live
@pytest.mark.timeout(300)
def test_the_plotly_bundle_is_sent_gzip_compressed_and_logged(stack):
    size = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").stat().st_size

    with httpx.stream("GET", stack.url + PLOTLY_URL, headers={"Accept-Encoding": "gzip"}, timeout=30) as response:
        sent = sum(len(chunk) for chunk in response.iter_raw())
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert sent < size / 2, (sent, size)
    # Asked for nothing compressed, the same URL gives the file itself.
    plain = httpx.get(stack.url + PLOTLY_URL, headers={"Accept-Encoding": "identity"}, timeout=30)
    assert "Content-Encoding" not in plain.headers and len(plain.content) == size

    def logged():
        lines = [json.loads(text) for text in stack.log("web").splitlines() if text.startswith('{"time"')]
        return next((line for line in lines if line["path"] == PLOTLY_URL), None)

    line = wait_until(logged, timeout=10, what="the access line of the bundle's request")
    assert (line["status"], line["route"], line["user"]) == (200, None, "anonymous")


def test_a_chat_request_with_a_key_is_logged_with_its_user(client, settings, alice, access_lines):
    """Chat checks its key itself (not through DRF): it must still say whose request it was."""
    settings.FT_RATE_LIMIT_RPM = 0
    key, raw = ApiKey.issue(alice, name="chat")

    response = client.post(
        "/v1/chat/completions",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )

    assert response.status_code == 404
    [line] = access_lines
    assert (line["route"], line["user"], line["key"]) == ("v1/chat/completions", alice.pk, key.key_id)
