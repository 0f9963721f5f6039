"""Which OpenMP runtime a serving process should run torch with.

The engine runs its forward passes on a thread of its own, not the process's
main thread. With the GNU OpenMP runtime that torch's CPU wheels load, a
parallel region started from such a thread on a machine with few cores pays a
wake-up for every operation (libgomp throttles its helpers' spinning once it
manages more threads than there are cores, and it counts the idle main thread):
decoding steps measured 1.5x slower there than the same steps on the main
thread (2 cores, SmolLM2-135M, batch 16: 111 against 68 ms). Intel's OpenMP
runtime (the `intel-openmp` wheel) serves torch's GNU OpenMP calls too and has
no such penalty (71 ms on the engine thread). Serving processes are therefore
started with it preloaded where it is installed; `FT_OPENMP=gnu` keeps torch's
own runtime.
"""

import os
import sys
from pathlib import Path

INTEL_OPENMP = "libiomp5.so"


def serving_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to add to a serving process's environment (empty when there is nothing to change)."""
    environ = dict(os.environ if environ is None else environ)
    library = Path(sys.prefix) / "lib" / INTEL_OPENMP
    if environ.get("FT_OPENMP") == "gnu" or not sys.platform.startswith("linux") or not library.is_file():
        return {}
    preloaded = [entry for entry in environ.get("LD_PRELOAD", "").split(":") if entry]
    if str(library) in preloaded:
        return {}
    return {"LD_PRELOAD": ":".join([str(library), *preloaded])}
