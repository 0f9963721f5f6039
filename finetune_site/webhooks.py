"""Signed webhook deliveries: JSON POST with an HMAC-SHA256 signature of the exact body.

A webhook URL is typed by a user and fetched by our workers, so it is checked as
untrusted (server-side request forgery):

- only http and https;
- the host is resolved once, and every address it resolves to must be a public
  one: not loopback, private, link-local (the cloud metadata address among them),
  multicast or reserved, unless the host or the address is in
  FT_WEBHOOK_ALLOWED_HOSTS (trusted internal receivers);
- the connection goes to the address that was checked (pinned), so a DNS answer
  that changes between the check and the connection changes nothing;
- redirects are not followed: a 3xx is a failed delivery.

One deadline covers the whole delivery (connect, send, status line, headers,
body), so a receiver that trickles a byte at a time cannot hold a worker.
"""

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Finetune-Signature"
TIMESTAMP_HEADER = "X-Finetune-Timestamp"
DELIVERY_DEADLINE_SECONDS = 15.0
"""The longest one delivery may take from connecting to the last byte of the answer."""
_ANSWER_BYTES_READ = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DeliveryFailed(Exception):
    """The receiver did not take the delivery (unreachable, too slow, not 2xx); it is retried."""


class UnsafeWebhookURL(ValueError):
    """A URL that is never delivered to: not http(s), or a host that resolves to a non-public address."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect (the pinned address) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of `timestamp.body`, so a captured request cannot be replayed later."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def check_url(url: str, *, allowed: Collection[str] = ()) -> Target:
    """Resolve and check a webhook URL; raise UnsafeWebhookURL saying why it may not be used.

    allowed: host names, addresses or networks (CIDR) that may be private, for receivers on
    a trusted network. A host that cannot be resolved raises DeliveryFailed (it may resolve later).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookURL(
            f"Only http:// and https:// webhook URLs are allowed, not {parts.scheme or 'no'} scheme."
        )
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:  # a port that is not a number, or out of range
        raise UnsafeWebhookURL(f"The webhook URL's port is not valid: {error}.") from None
    if not host:
        raise UnsafeWebhookURL("The webhook URL has no host.")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise DeliveryFailed(f"The webhook host {host!r} cannot be resolved: {error}.") from None
    addresses = [_plain(ipaddress.ip_address(info[4][0].split("%")[0])) for info in found]
    if not _trusted(host, addresses, allowed):
        refused = sorted({str(address) for address in addresses if not _public(address)})
        if refused:
            raise UnsafeWebhookURL(
                f"The webhook host {host!r} resolves to {', '.join(refused)}, which is not a public address; "
                "internal receivers must be listed in FT_WEBHOOK_ALLOWED_HOSTS."
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme=parts.scheme, host=host, port=port, address=str(addresses[0]), path=path)


def deliver(
    url: str,
    payload: dict,
    secret: str,
    *,
    allowed: Collection[str] = (),
    deadline: float = DELIVERY_DEADLINE_SECONDS,
) -> int:
    """POST the signed payload to url; return the receiver's 2xx status or raise DeliveryFailed."""
    target = check_url(url, allowed=allowed)
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "finetune-console-webhook",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    connection = _pinned_connection(target, timeout=deadline)
    # The socket timeout bounds each read; the timer bounds them all together.
    timer = threading.Timer(deadline, _abort, args=(connection,))
    timer.start()
    started = time.monotonic()
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(_ANSWER_BYTES_READ)
        status = response.status
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() - started >= deadline:
            raise DeliveryFailed(f"{url} did not answer within {deadline:g} s") from None
        raise DeliveryFailed(f"{url} unreachable: {error}") from None
    finally:
        timer.cancel()
        connection.close()
    if 300 <= status < 400:
        raise DeliveryFailed(f"{url} answered {status}: webhook redirects are not followed")
    if not 200 <= status < 300:
        raise DeliveryFailed(f"{url} answered {status}")
    return status


def _plain(address: Address) -> Address:
    # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel, whatever its IPv6 spelling says.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _public(address: Address) -> bool:
    return address.is_global and not address.is_multicast


def _trusted(host: str, addresses: list[Address], allowed: Collection[str]) -> bool:
    names = {entry.strip().lower() for entry in allowed if entry.strip()}
    if host.lower() in names:
        return True
    networks = []
    for entry in names:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:  # a host name, handled above
            continue
    return bool(networks) and all(any(address in network for network in networks) for address in addresses)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a checked address; the Host header still names the URL's host."""

    def __init__(self, target: Target, *, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified against the URL's host."""

    def __init__(self, target: Target, *, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = target.address
        self.tls = ssl.create_default_context()

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)


def _pinned_connection(target: Target, *, timeout: float) -> http.client.HTTPConnection:
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    return kind(target, timeout=timeout)


def _abort(connection: http.client.HTTPConnection) -> None:
    """Wake a read blocked past the deadline: shutting the socket down ends it at once."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed or never connected
            pass
