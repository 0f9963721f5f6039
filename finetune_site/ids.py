import secrets


def new_id(prefix: str) -> str:
    """An OpenAI-style public id such as `file-3f9a...` (24 hex characters)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def unix(dt) -> int | None:
    """Integer Unix seconds, the only timestamp form the SDKs accept."""
    return int(dt.timestamp()) if dt else None
