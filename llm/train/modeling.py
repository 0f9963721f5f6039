"""Loading the model for a method on a device, planning its memory, and saving what it learned."""

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import TrainConfig
from .hf import ModelShape, TrainableModel, TrainTokenizer
from .packing import ATTENTION

CPU_MICRO_BATCH_TOKENS = 768
"""Measured on 2 cores with SmolLM2-135M LoRA (benchmarks.train_vs_trl): 768-token rows ran 264 tokens/s
at 3.9 GB peak, 2048-token rows 224 tokens/s at 6.5 GB. Past a few hundred tokens the matmuls are
already efficient, and bigger rows only add activation memory (about 3 MB of fp32 per token
for a 135M model) and time."""
CUDA_MICRO_BATCH_TOKENS = 16384
_CUDA_MEMORY_SHARE = 0.6
"""Fraction of the free GPU memory (after loading weights) that activations may take."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    weights_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    """bf16 on CUDA: matmuls in bf16, master weights and adapters as loaded."""


def place(config: TrainConfig) -> Placement:
    """Choose device and dtypes: CUDA with bf16 compute when present, otherwise CPU in fp32."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return Placement(torch.device("cpu"), torch.float32, None)
    if not torch.cuda.is_bf16_supported():  # pre-Ampere: fp32 is slow but needs no loss scaling
        return Placement(torch.device("cuda"), torch.float32, None)
    # Full fine-tuning keeps fp32 master weights: bf16 weights would round small updates away.
    weights = torch.float32 if config.method == "full" else torch.bfloat16
    return Placement(torch.device("cuda"), weights, torch.bfloat16)


def use_cpu_threads() -> int:
    """Use every core this process may run on, unless OMP_NUM_THREADS says otherwise."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def load_tokenizer(model_dir: str) -> TrainTokenizer:
    tokenizer: TrainTokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer


def load_model(config: TrainConfig, placement: Placement, *, checkpoint: str | None = None) -> TrainableModel:
    """Load the base model and make it trainable for config.method.

    Weights start from checkpoint when given (resume), else from config.init_from (an earlier
    fine-tune: its adapter is trained further, or its full weights), else from the base.
    """
    full_weights_from = config.model
    if config.method == "full":
        full_weights_from = checkpoint or config.init_from or config.model
    options: dict[str, Any] = {"dtype": placement.weights_dtype, "attn_implementation": ATTENTION}
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        options["device_map"] = {"": torch.cuda.current_device()}
    model: TrainableModel = AutoModelForCausalLM.from_pretrained(full_weights_from, **options)
    if config.method != "qlora":
        model.to(placement.device)
    model.config.use_cache = False

    if config.method == "full":
        return model
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(config.seed)  # the adapter's initial weights
    with warnings.catch_warnings():
        # peft 0.21 still calls the name transformers 5 deprecated; nothing for us to change.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if config.init_from:
            model = PeftModel.from_pretrained(model, config.init_from, is_trainable=True)
        else:
            model = get_peft_model(model, lora_config(config))
    if checkpoint:
        set_peft_model_state_dict(model, load_peft_weights(checkpoint, device=str(placement.device)))
    return model


def lora_config(config: TrainConfig) -> LoraConfig:
    targets = config.target_modules
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [name.strip() for name in targets.split(",")],
        use_rslora=config.use_rslora,
        use_dora=config.method == "dora",
        bias="none",
    )


def plan_memory(config: TrainConfig, model: TrainableModel, placement: Placement) -> tuple[int, bool]:
    """Return (tokens per micro-batch, gradient checkpointing on?) for this model on this device."""
    # An example longer than the budget still runs, alone in its micro-batch.
    if config.micro_batch_tokens:
        budget = config.micro_batch_tokens
    elif placement.device.type == "cuda":
        budget = max(config.max_seq_len, CUDA_MICRO_BATCH_TOKENS)
    else:
        budget = CPU_MICRO_BATCH_TOKENS
    if config.gradient_checkpointing != "auto":
        return budget, config.gradient_checkpointing == "on"
    if placement.device.type != "cuda":
        return budget, False
    free_bytes, _ = torch.cuda.mem_get_info(placement.device)
    allowed = _CUDA_MEMORY_SHARE * free_bytes
    per_token = activation_bytes_per_token(model.config, bytes_per_value=2)
    if budget * per_token <= allowed:
        return budget, False
    # Checkpointing keeps one hidden state per layer and recomputes the rest in backward.
    per_token_checkpointed = model.config.num_hidden_layers * model.config.hidden_size * 2 * 2
    budget = max(config.max_seq_len, min(budget, int(allowed / per_token_checkpointed)))
    return budget, True


def activation_bytes_per_token(model_config: ModelShape, *, bytes_per_value: int) -> int:
    """A rough count of what backward keeps per token: attention and MLP inputs and intermediates, every layer."""
    hidden, intermediate = model_config.hidden_size, model_config.intermediate_size
    return model_config.num_hidden_layers * (20 * hidden + 6 * intermediate) * bytes_per_value


def enable_gradient_checkpointing(model: TrainableModel) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_weights(
    model: TrainableModel,
    tokenizer: TrainTokenizer,
    directory: Path,
    *,
    full: bool,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write an adapter (PEFT format) or a full model with its tokenizer into directory.

    weights: the full state dict of a model sharded over several processes (FSDP2), gathered
    for this write; None saves the model's own tensors.
    """
    if weights is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=weights)
        _name_the_real_architecture(Path(directory))
    if full:
        tokenizer.save_pretrained(directory)


def _name_the_real_architecture(directory: Path) -> None:
    """FSDP2 renames a sharded model's class (FSDPLlamaForCausalLM); the saved config must name the real one."""
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    names = config.get("architectures") or []
    real = [name.removeprefix("FSDP") for name in names]
    if real != names:
        config["architectures"] = real
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def count_parameters(model: TrainableModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
