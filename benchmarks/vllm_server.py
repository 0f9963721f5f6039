"""vLLM's OpenAI server called directly, for the benchmarks' comparison: found in its own venv, started, stopped.

Starting and stopping are the serving backend's own (`llm/serve/vllm.py`); this adds what a benchmark
wants: the venv found by default, the adapter named on the command line, and the cores vLLM used.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from llm.serve.errors import ModelLoadError
from llm.serve.vllm import VllmServer, VllmSettings, installed_version, lora_rank_limit, start_server
from tests.live import REPO

DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
KV_CACHE_GIB = 2.0
"""VLLM_CPU_KVCACHE_SPACE unless set: 2 GiB holds about 93,000 SmolLM2-135M tokens, far past 16 streams."""

__all__ = ["BenchServer", "find_python", "installed_version", "start_vllm", "stop_vllm"]


@dataclass
class BenchServer:
    server: VllmServer
    model: str
    """The name requests ask for: the base's served name, or the LoRA module's name."""

    @property
    def url(self) -> str:
        return self.server.url

    def compute_cores(self) -> str | None:
        """The cores vLLM bound its compute threads to, as its log says (it reserves others for its API server)."""
        found = re.findall(r"core ids=\[([^\]]*)\]", self.server.log_path.read_text(errors="replace"))
        return found[-1] if found else None


def find_python(explicit: str | None) -> Path | None:
    """The python of the vLLM venv: the one asked for, else .venv-vllm's if it exists."""
    if explicit:
        return Path(explicit)
    return DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else None


def start_vllm(
    python: Path, model_dir: Path, served_name: str, log_path: Path, *, lora: tuple[str, Path] | None = None
) -> BenchServer:
    """Start `vllm serve` on model_dir in bf16 (with one LoRA module when given) and wait until it answers."""
    settings = VllmSettings(python=python, log_path=log_path, kv_cache_gib=KV_CACHE_GIB, max_model_len=2048)
    try:
        server = start_server(
            settings,
            model_dir,
            served_name,
            lora_rank=lora_rank_limit(lora[1]) if lora else None,
            lora_modules=[lora] if lora else (),
        )
    except ModelLoadError as exc:
        raise RuntimeError(str(exc)) from exc
    return BenchServer(server, lora[0] if lora else served_name)


def stop_vllm(server: BenchServer) -> None:
    server.server.stop()
