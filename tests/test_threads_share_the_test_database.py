"""The threaded tests (a worker thread beside the test's own reads) need SQLite's test database to let a
writer through while another connection reads, as the product's WAL file does."""

import threading

import pytest
from django.contrib.auth.models import User
from django.db import DatabaseError


@pytest.mark.django_db(transaction=True)
def test_a_thread_writes_while_the_test_holds_a_read_open():
    for i in range(20):
        User.objects.create(username=f"user{i}")
    reading = User.objects.all().iterator(chunk_size=1)
    next(reading)  # the statement stays open, and with it its read of the table
    failures: list[Exception] = []

    def write():
        try:
            User.objects.filter(username="user1").update(first_name="Ada")
        except DatabaseError as exc:  # "database table is locked" without the conftest's pragma
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    assert not failures
    assert User.objects.get(username="user1").first_name == "Ada"
