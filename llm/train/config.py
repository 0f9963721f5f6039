"""What one training run needs to know, checked all at once before anything loads."""

import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path

METHODS = ("lora", "dora", "full", "qlora")
SCHEDULERS = ("cosine", "linear", "constant")
LOSS_ON = ("assistant", "all")
DEVICES = ("auto", "cpu", "cuda")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
STATE_FILE = "training_state.pt"
"""The plain-dict state file inside every checkpoint directory."""


class ConfigError(ValueError):
    """The run cannot start; problems lists every reason, one sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TrainConfig:
    model: str
    """Folder of a Hugging Face causal LM (config.json, weights, tokenizer with a chat template)."""
    train_file: str
    """JSONL file, one {"messages": [...], "tools": [...]} conversation a line."""
    out_dir: str
    """Where adapter/ or model/, checkpoints/, config.json, metrics.jsonl and summary.json go."""
    validation_file: str | None = None
    """Optional JSONL file in the same format; enables eval_loss and eval_token_accuracy."""
    method: str = "lora"
    """lora, dora (weight-decomposed LoRA), full (every weight) or qlora (4-bit base, CUDA only)."""
    epochs: int = 3
    """Passes over the training file."""
    batch_size: int = 8
    """Examples per optimizer step, however they are split into micro-batches."""
    lr: float = 2e-4
    """Peak learning rate, reached after warmup."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; 0 skips the dropout op entirely."""
    target_modules: str = "all-linear"
    """all-linear, or comma-separated module names such as q_proj,v_proj."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    max_seq_len: int = 1024
    """Longer examples are cut to this many tokens and counted in the summary."""
    loss_on: str = "assistant"
    """assistant: learn only from assistant replies (weight 0 excluded); all: from every token."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent ramping the learning rate up linearly."""
    scheduler: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear (both to 0) or constant."""
    eval_every: int = 0
    """Validate every N optimizer steps; 0 validates only at the end."""
    save_every: int = 0
    """Checkpoint every N optimizer steps; 0 checkpoints only at the end of each epoch."""
    early_stopping_patience: int = 0
    """Finish early after this many validations in a row without a lower validation loss; 0 never does."""
    seed: int = 42
    """Seeds weight init of the adapter, dropout and the per-epoch data order."""
    resume_from: str | None = None
    """A checkpoints/step-N folder of this run to continue from."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (never applied to norms and biases)."""
    log_every: int = 1
    """Report training metrics every N optimizer steps (and always on the last)."""
    gradient_checkpointing: str = "auto"
    """auto (only when activations would not fit in GPU memory; off on CPU), on or off."""
    micro_batch_tokens: int = 0
    """Tokens packed into one forward pass; a step holding more is accumulated. 0 picks per device."""

    def problems(self) -> list[str]:
        """Return every problem with this config, one line each; empty when it can run."""
        found = []

        def check(ok, field, message):
            if not ok:
                found.append(f"{field}: {message}")

        model = Path(self.model)
        check((model / "config.json").is_file(), "model", f"{self.model} is not a model folder (no config.json)")
        check(Path(self.train_file).is_file(), "train_file", f"{self.train_file} does not exist")
        if self.validation_file is not None:
            check(Path(self.validation_file).is_file(), "validation_file", f"{self.validation_file} does not exist")
        check(str(self.out_dir).strip() != "", "out_dir", "must be given")
        if self.resume_from is not None:
            state = Path(self.resume_from) / STATE_FILE
            check(state.is_file(), "resume_from", f"{self.resume_from} is not a checkpoint (no {STATE_FILE})")

        check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        check(self.loss_on in LOSS_ON, "loss_on", f"must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        check(self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check(
            self.gradient_checkpointing in GRADIENT_CHECKPOINTING, "gradient_checkpointing",
            f"must be one of {', '.join(GRADIENT_CHECKPOINTING)}, got {self.gradient_checkpointing!r}",
        )

        check(_is_int(self.epochs) and self.epochs >= 1, "epochs", f"must be a whole number >= 1, got {self.epochs!r}")
        check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", f"must be a whole number >= 1, got {self.batch_size!r}")
        check(_is_number(self.lr) and 0 < self.lr < 1, "lr", f"must be between 0 and 1 (exclusive), got {self.lr!r}")
        check(_is_int(self.max_seq_len) and self.max_seq_len >= 8, "max_seq_len", f"must be a whole number >= 8, got {self.max_seq_len!r}")
        check(_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        check(_is_int(self.eval_every) and self.eval_every >= 0, "eval_every", f"must be a whole number >= 0, got {self.eval_every!r}")
        check(_is_int(self.save_every) and self.save_every >= 0, "save_every", f"must be a whole number >= 0, got {self.save_every!r}")
        check(
            _is_int(self.early_stopping_patience) and self.early_stopping_patience >= 0, "early_stopping_patience",
            f"must be a whole number >= 0 (0 = off), got {self.early_stopping_patience!r}",
        )
        if _is_int(self.early_stopping_patience) and self.early_stopping_patience > 0:
            check(bool(self.validation_file), "early_stopping_patience", "needs a validation file to watch")
            check(_is_int(self.eval_every) and self.eval_every > 0, "early_stopping_patience", "needs eval_every > 0 (validations to compare)")
        check(_is_int(self.seed) and self.seed >= 0, "seed", f"must be a whole number >= 0, got {self.seed!r}")
        check(_is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip!r}")
        check(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        check(_is_int(self.log_every) and self.log_every >= 1, "log_every", f"must be a whole number >= 1, got {self.log_every!r}")
        check(
            _is_int(self.micro_batch_tokens) and self.micro_batch_tokens >= 0, "micro_batch_tokens",
            f"must be a whole number >= 0 (0 = auto), got {self.micro_batch_tokens!r}",
        )

        if self.method != "full":
            check(_is_int(self.lora_r) and self.lora_r >= 1, "lora_r", f"must be a whole number >= 1, got {self.lora_r!r}")
            check(_is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
            check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
            check(
                isinstance(self.target_modules, str) and all(name.strip() for name in self.target_modules.split(",")),
                "target_modules", f"must be all-linear or comma-separated module names, got {self.target_modules!r}",
            )

        if self.method == "qlora":
            check(
                _cuda_available() and self.device != "cpu", "method",
                "qlora needs a CUDA GPU (its 4-bit base runs on bitsandbytes); use lora on this machine",
            )
            check(_has_module("bitsandbytes"), "method", "qlora needs the bitsandbytes package, which is not installed")
        if self.device == "cuda":
            check(_cuda_available(), "device", "cuda was asked for but no CUDA GPU is available")
        return found

    def check(self) -> None:
        """Raise ConfigError listing every problem, if there are any."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    @property
    def uses_adapter(self) -> bool:
        return self.method != "full"


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
