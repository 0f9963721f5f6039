"""Child processes that must not outlive the process that started them."""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def ends_with_its_parent() -> None:
    """As a Popen preexec_fn: Linux sends the child SIGTERM when the thread that started it dies, even by
    SIGKILL, so a child in a session of its own (out of reach of its parent's group signals) still stops.
    Does nothing elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
