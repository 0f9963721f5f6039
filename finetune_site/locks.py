"""Serialising a check-then-write across processes, inside the current transaction."""

import zlib

from django.db import connection


def hold_until_commit(name: str) -> None:
    """Block until no other transaction holds `name`; keep it until this one ends.

    Counting what is in use and then adding to it is a race when two requests do it
    at once: both count the same, both pass. On PostgreSQL a transaction-level
    advisory lock serialises them. SQLite needs nothing: its transactions start
    IMMEDIATE here (settings.py), so only one writer is ever inside one.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("hold_until_commit() needs a transaction: the lock ends with it")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(name.encode())])
