"""Helpers the serving tests share."""

import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from llm.serve.schema import Completion, GenerationRequest

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(base_dir: Path, dest: Path, *, seed: int) -> Path:
    """Save a LoRA adapter for base_dir whose weights are random, so it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero, which would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(dest)
    return dest


def chat(base_dir, text="Hello there, how are you?", **fields) -> GenerationRequest:
    """A one-message greedy request, unless fields say otherwise."""
    fields = {"temperature": 0.0, "max_tokens": 16, **fields}
    return GenerationRequest(base_path=str(base_dir), messages=[{"role": "user", "content": text}], **fields)


def drain(stream) -> tuple[list[str], Completion]:
    """Consume a stream; return its text pieces and its Completion."""
    events = list(stream)
    assert isinstance(events[-1], Completion) and all(isinstance(event, str) for event in events[:-1])
    return events[:-1], events[-1]


@contextmanager
def paused(model):
    """Hold the model's forward passes (its engine waits at the next one) until the block ends.

    The engine generates ahead of its readers, so a test that needs a request still
    in flight at some moment must stop the engine there rather than stop reading.
    """
    go = threading.Event()

    def wait(module, args):
        go.wait(timeout=60)

    handle = model.register_forward_pre_hook(wait)
    try:
        yield
    finally:
        go.set()
        handle.remove()


# What the chat-parameter tests (engine, SDK, live) constrain answers to.
COLOR = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "clock",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
