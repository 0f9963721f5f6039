"""A webhook receiver that answers one byte every few seconds and never finishes (issue 13, finding 3):
while it holds every notifications thread, datasets are still validated and the recovery sweeps still run."""

import socket
import threading
import time

import pytest

from ..live import chat_lines, wait_until

pytestmark = [pytest.mark.live, pytest.mark.faults, pytest.mark.timeout(600)]

DELIVERIES = 8
"""Twice the notifications worker's threads: every one of them is held, and more wait."""


class TricklingReceiver:
    """Accepts webhook POSTs and answers a byte every two seconds, forever; counts open deliveries."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.open = 0
        self.received = 0
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.trickle, args=(connection,), daemon=True).start()

    def trickle(self, connection: socket.socket):
        with self.lock:
            self.open += 1
            self.received += 1
        try:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not self.stopped.wait(2):
                connection.sendall(b"x")
        except OSError:
            pass  # the sender gave up: its deadline passed
        finally:
            connection.close()
            with self.lock:
                self.open -= 1

    def close(self):
        self.stopped.set()
        self.server.close()


@pytest.fixture
def receiver():
    running = TricklingReceiver()
    yield running
    running.close()


def sweeps_run(stack) -> int:
    log = stack.log("worker-housekeeping")
    return sum(1 for line in log.splitlines() if "recover_stale_jobs" in line and "succeeded" in line)


def test_validation_and_recovery_go_on_while_a_slow_receiver_holds_the_deliveries(fault_stack, bob, receiver):
    fault_stack.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User\n"
        "from finetune_site.models import NotificationSettings\n"
        "from finetune_site.services import notify\n"
        "user = User.objects.get(username='bob')\n"
        f"NotificationSettings.objects.update_or_create(user=user, defaults={{'webhook_url': '{receiver.url}'}})\n"
        f"for n in range({DELIVERIES}):\n"
        "    notify(user, f'notice {n}', event='test')\n",
    )
    wait_until(lambda: receiver.open >= 4, timeout=60, what="the receiver to hold every notifications thread")
    held_since, sweeps_before = time.monotonic(), sweeps_run(fault_stack)

    uploaded = bob.files.create(file=("held.jsonl", chat_lines(20, seed_word="violet")), purpose="fine-tune")
    validated = bob.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=60)
    assert validated.status == "processed", validated
    wait_until(lambda: sweeps_run(fault_stack) >= sweeps_before + 2, timeout=60, what="two recovery sweeps")

    # All the while the deliveries were held: the receiver never let go, it was the senders' deadline.
    assert receiver.open >= 1, "the receiver was not holding deliveries while the rest was checked"
    assert receiver.received >= 4
    assert time.monotonic() - held_since < 90
