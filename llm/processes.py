"""Child processes that must not outlive the process that started them."""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Looked up now, not in the child: loading a library between fork and exec, in a process with other
# threads, can deadlock.
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None


def ends_with_its_parent() -> None:
    """As a Popen preexec_fn: Linux sends the child SIGTERM when the thread that started it dies, even by
    SIGKILL, so a child in a session of its own (out of reach of its parent's group signals) still stops.
    Does nothing elsewhere."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
