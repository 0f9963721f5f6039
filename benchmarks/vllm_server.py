"""vLLM's OpenAI server as a subprocess of a benchmark: found in its own venv, started on a free port, stopped.

vLLM lives in `.venv-vllm` (`make install-vllm`), never in the project's venv: its CPU build pins
its own transformers and friends. Nothing here imports it; the server runs under that venv's python.
"""

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.live import REPO, free_port

DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
KV_CACHE_GIB = "2"
"""VLLM_CPU_KVCACHE_SPACE unless set: 2 GiB holds about 93,000 SmolLM2-135M tokens, far past 16 streams."""


@dataclass
class VllmServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    model: str
    """The name requests ask for: the base's served name, or the LoRA module's name."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(line for line in text.splitlines() if "Attempted to load weight" not in line)[-lines * 200 :]

    def compute_cores(self) -> str | None:
        """The cores vLLM bound its compute threads to, as its log says (it reserves others for its API server)."""
        found = re.findall(r"core ids=\[([^\]]*)\]", self.log_path.read_text(errors="replace"))
        return found[-1] if found else None


def find_python(explicit: str | None) -> Path | None:
    """The python of the vLLM venv: the one asked for, else .venv-vllm's if it exists."""
    if explicit:
        return Path(explicit)
    return DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else None


def installed_version(python: Path) -> str | None:
    """vLLM's version in that venv, or None when it has no vLLM."""
    probe = subprocess.run(
        [str(python), "-c", "from vllm._version import __version__; print(__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def start_vllm(
    python: Path,
    model_dir: Path,
    served_name: str,
    log_path: Path,
    *,
    lora: tuple[str, Path] | None = None,
    max_lora_rank: int = 16,
    timeout: float = 900,
) -> VllmServer:
    """Start `vllm serve` on model_dir in bf16 (with one LoRA module when given) and wait until it answers."""
    port = free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--dtype",
        "bfloat16",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
    ]
    if lora is not None:
        name, adapter_dir = lora
        command += ["--enable-lora", "--lora-modules", f"{name}={adapter_dir}", "--max-lora-rank", str(max_lora_rank)]
    # The project's venv must not leak into vLLM's: its own python finds its own packages.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    server = VllmServer(process, port, log_path, lora[0] if lora else served_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {process.returncode} while starting:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_vllm(server)
    raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s:\n{server.log_tail()}")


def stop_vllm(server: VllmServer) -> None:
    """Stop the server and its engine processes (its own session, started by start_vllm)."""
    group = server.process.pid
    if server.process.poll() is None:
        os.killpg(group, signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    # The engine core is a child in the same group and may outlive the API server by a moment.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait()
