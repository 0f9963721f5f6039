"""What one training run needs to know, checked all at once before anything loads."""

import importlib.util
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .hyperparameters import (
    BASE_LEARNING_RATE,
    BATCH_SIZE,
    BETA,
    EARLY_STOPPING_PATIENCE,
    EVAL_EVERY,
    HYPERPARAMETERS,
    LEARNING_RATE_MULTIPLIER,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    MAX_SEQ_LEN,
    N_EPOCHS,
    SAVE_EVERY,
    TARGET_MODULES,
    WARMUP_RATIO,
)

METHODS = ("lora", "dora", "full", "qlora")
OBJECTIVES = ("sft", "dpo")
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
    # The defaults and bounds of the fields a user may set come from their definitions
    # (llm/train/hyperparameters.py), so the engine, the form and the API never disagree.
    model: str
    """Folder of a Hugging Face causal LM (config.json, weights, tokenizer with a chat template)."""
    train_file: str
    """JSONL file, one {"messages": [...], "tools": [...]} conversation a line (sft), or one
    {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]} pair a line (dpo)."""
    out_dir: str
    """Where adapter/ or model/, checkpoints/, config.json, metrics.jsonl and summary.json go."""
    validation_file: str | None = None
    """Optional JSONL file in the same format; enables eval_loss and eval_token_accuracy."""
    method: str = "lora"
    """lora, dora (weight-decomposed LoRA), full (every weight) or qlora (4-bit base, CUDA only)."""
    objective: str = "sft"
    """sft: learn the replies of conversations; dpo: prefer the preferred answer of each pair (DPO)."""
    dpo_beta: float = BETA.default
    """DPO's beta: how strongly the log-probability ratios to the reference model are scaled."""
    init_from: str | None = None
    """Start from an earlier fine-tune of the same base: an adapter folder (lora, dora, qlora) that
    training continues, or a full model folder (full). For dpo it is also the reference model."""
    epochs: int = N_EPOCHS.default
    """Passes over the training file."""
    batch_size: int = BATCH_SIZE.default
    """Examples per optimizer step, however they are split into micro-batches."""
    lr: float = BASE_LEARNING_RATE["lora"] * LEARNING_RATE_MULTIPLIER.default
    """Peak learning rate, reached after warmup."""
    lora_r: int = LORA_RANK.default
    """LoRA rank."""
    lora_alpha: float = LORA_ALPHA.default
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = LORA_DROPOUT.default
    """Dropout on the LoRA input; 0 skips the dropout op entirely."""
    target_modules: str = TARGET_MODULES.default
    """all-linear, or comma-separated module names such as q_proj,v_proj."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    max_seq_len: int = MAX_SEQ_LEN.default
    """Longer examples are cut to this many tokens and counted in the summary."""
    loss_on: str = "assistant"
    """assistant: learn only from assistant replies (weight 0 excluded); all: from every token."""
    warmup_ratio: float = WARMUP_RATIO.default
    """Fraction of the optimizer steps spent ramping the learning rate up linearly."""
    scheduler: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear (both to 0) or constant."""
    eval_every: int = EVAL_EVERY.default
    """Validate every N optimizer steps; 0 validates only at the end."""
    save_every: int = SAVE_EVERY.default
    """Checkpoint every N optimizer steps; 0 checkpoints only at the end of each epoch."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints, plus the one with the best validation loss; 0 keeps them all.
    Only the newest keeps the optimizer state."""
    early_stopping_patience: int = EARLY_STOPPING_PATIENCE.default
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
        found: list[str] = []

        def check(ok: bool, field: str, message: str) -> None:
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
        check(
            self.objective in OBJECTIVES,
            "objective",
            f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )
        if self.init_from is not None:
            marker = "adapter_config.json" if self.uses_adapter else "config.json"
            kind = "an adapter folder" if self.uses_adapter else "a full model folder"
            check(
                (Path(self.init_from) / marker).is_file(),
                "init_from",
                f"{self.init_from} is not {kind} (no {marker}) for method {self.method}",
            )
            if self.uses_adapter and (Path(self.init_from) / marker).is_file():
                dora = bool(_json_file(Path(self.init_from) / marker).get("use_dora"))
                check(
                    dora == (self.method == "dora"),
                    "init_from",
                    f"{self.init_from} is a {'DoRA' if dora else 'LoRA'} adapter; "
                    f"continue it with method {'dora' if dora else 'lora'}, not {self.method}",
                )
        check(self.loss_on in LOSS_ON, "loss_on", f"must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        check(
            self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
        )
        check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check(
            self.gradient_checkpointing in GRADIENT_CHECKPOINTING,
            "gradient_checkpointing",
            f"must be one of {', '.join(GRADIENT_CHECKPOINTING)}, got {self.gradient_checkpointing!r}",
        )

        for definition in HYPERPARAMETERS:
            if definition is LEARNING_RATE_MULTIPLIER:
                # The engine takes the rate the multiplier scaled, so it checks that rate instead.
                check(
                    _is_number(self.lr) and 0 < self.lr < 1,
                    "lr",
                    f"must be between 0 and 1 (exclusive), got {self.lr!r}",
                )
            elif (
                definition.engine_name is not None
                and not (definition.adapter_only and not self.uses_adapter)
                and self.objective in definition.objectives
            ):
                problem = definition.engine_problem(getattr(self, definition.engine_name))
                check(problem is None, definition.engine_name, problem or "")
        if _is_int(self.early_stopping_patience) and self.early_stopping_patience > 0:
            check(bool(self.validation_file), "early_stopping_patience", "needs a validation file to watch")
            check(
                _is_int(self.eval_every) and self.eval_every > 0,
                "early_stopping_patience",
                "needs eval_every > 0 (validations to compare)",
            )
        check(_is_int(self.seed) and self.seed >= 0, "seed", f"must be a whole number >= 0, got {self.seed!r}")
        check(
            _is_number(self.grad_clip) and self.grad_clip >= 0,
            "grad_clip",
            f"must be >= 0 (0 = off), got {self.grad_clip!r}",
        )
        check(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            f"must be >= 0, got {self.weight_decay!r}",
        )
        check(
            _is_int(self.keep_checkpoints) and self.keep_checkpoints >= 0,
            "keep_checkpoints",
            f"must be a whole number >= 0 (0 = keep all), got {self.keep_checkpoints!r}",
        )
        check(
            _is_int(self.log_every) and self.log_every >= 1,
            "log_every",
            f"must be a whole number >= 1, got {self.log_every!r}",
        )
        check(
            _is_int(self.micro_batch_tokens) and self.micro_batch_tokens >= 0,
            "micro_batch_tokens",
            f"must be a whole number >= 0 (0 = auto), got {self.micro_batch_tokens!r}",
        )

        if self.method == "qlora":
            check(
                _cuda_available() and self.device != "cpu",
                "method",
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_file(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
