"""Typed readers for settings that come from the environment.

Each reader fails loudly with the variable's name, so a typo in a deployment
shows up at start-up instead of as odd behaviour later. `load_env_files`
reads the optional `.env` files once, before any reader runs.
"""

import ipaddress
import os
import re
import secrets
from collections.abc import MutableMapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from dotenv import dotenv_values

_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bucket(name: str) -> str:
    """An s3://bucket[/prefix] address, or "" when unset; anything else stops the start saying what it should be."""
    raw = os.environ.get(name, "").strip()
    if raw and (not raw.startswith("s3://") or not raw[len("s3://") :].split("/")[0]):
        raise ImproperlyConfigured(f"{name} must look like s3://bucket or s3://bucket/prefix, got {raw!r}")
    return raw


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be <= {maximum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def persistent_secret(path: Path) -> str:
    """Return the secret stored at path, creating it on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(50)
    # Another process may race us on first start: keep whichever landed first.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def env_host(name: str, default: str) -> str:
    """An address to bind to: an IPv4 or IPv6 address, or a host name."""
    value = os.environ.get(name) or default
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST_NAME.fullmatch(value):
            raise ImproperlyConfigured(f"{name} must be an IP address or a host name, got {value!r}") from None
    return value


def load_env_files(repo_dir: Path, environ: MutableMapping[str, str] = os.environ) -> None:
    """Read `repo_dir/.env`, then `FT_HOME/.env` over it, into environ; variables already set win over both.

    FT_HOME itself comes from the environment (`make` sets it), since it says where the second file is.
    """
    home = Path(environ.get("FT_HOME") or repo_dir / "var")
    values = {**dotenv_values(repo_dir / ".env"), **dotenv_values(home / ".env")}
    for name, value in values.items():
        if value is not None and name != "FT_HOME":
            environ.setdefault(name, value)
