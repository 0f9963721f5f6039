"""Signed webhook deliveries: JSON POST with an HMAC-SHA256 signature of the exact body."""

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

SIGNATURE_HEADER = "X-Finetune-Signature"
TIMESTAMP_HEADER = "X-Finetune-Timestamp"


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx; the delivery is retried."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of `timestamp.body`, so a captured request cannot be replayed later."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def deliver(url: str, payload: dict, secret: str, *, timeout: float = 10.0) -> int:
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "finetune-console-webhook",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise DeliveryFailed(f"{url} unreachable: {exc}") from None
