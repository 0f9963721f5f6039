"""Checking and resolving the hyperparameters of a job ("auto" becomes a number)."""

import math

from finetune_site.api_errors import ApiError

METHODS = ("lora", "dora", "full", "qlora")
# name -> (type, minimum, maximum)
_LIMITS = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-4, 100.0),
    "lora_rank": (int, 1, 256),
    "lora_alpha": (int, 1, 1024),
    "lora_dropout": (float, 0.0, 0.9),
    "max_seq_len": (int, 32, 32768),
    "eval_every": (int, 0, 1_000_000),
    "save_every": (int, 0, 1_000_000),
    "warmup_ratio": (float, 0.0, 0.5),
    "early_stopping_patience": (int, 0, 1000),
    "target_modules": (str, None, None),
}
_BASE_LEARNING_RATE = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5}


def check_hyperparameters(raw: dict | None, *, param_prefix: str = "hyperparameters") -> dict:
    """Return the requested values with types checked; raise ApiError naming the first bad one."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError("hyperparameters must be an object.", param=param_prefix)
    checked = {}
    for name, value in raw.items():
        if name not in _LIMITS:
            allowed = ", ".join(sorted(_LIMITS))
            raise ApiError(f"Unknown hyperparameter {name!r}; expected one of {allowed}.", param=f"{param_prefix}.{name}")
        if value is None or value == "auto":
            checked[name] = "auto"
            continue
        kind, low, high = _LIMITS[name]
        if kind is str:
            if not isinstance(value, str) or not value.strip() or not all(part.strip().replace("_", "").replace(".", "").replace("-", "").isalnum() for part in value.split(",")):
                raise ApiError(f"{name} must be \"all-linear\" or a comma-separated list of module names, got {value!r}.", param=f"{param_prefix}.{name}")
            checked[name] = value.strip()
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            expected = "an integer" if kind is int else "a number"
            raise ApiError(f"{name} must be {expected} or \"auto\", got {value!r}.", param=f"{param_prefix}.{name}")
        if not low <= value <= high:
            raise ApiError(f"{name} must be between {low} and {high}, got {value}.", param=f"{param_prefix}.{name}")
        checked[name] = kind(value)
    return checked


def resolve_hyperparameters(requested: dict, *, method: str, examples: int) -> dict:
    """Fill every "auto" from the method and the size of the training set."""
    def pick(name, default):
        value = requested.get(name, "auto")
        return default if value == "auto" else value

    batch_size = pick("batch_size", max(1, min(8, examples // 8 or 1)))
    # Small sets need more passes to move the model; large sets fewer.
    epochs = pick("n_epochs", max(1, min(10, math.ceil(240 / max(examples, 1)))) if examples < 80 else 3)
    multiplier = pick("learning_rate_multiplier", 1.0)
    resolved = {
        "n_epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate_multiplier": float(multiplier),
        "learning_rate": _BASE_LEARNING_RATE[method] * float(multiplier),
        "max_seq_len": int(pick("max_seq_len", 1024)),
        "eval_every": int(pick("eval_every", 0)),
        "save_every": int(pick("save_every", 0)),
        "warmup_ratio": float(pick("warmup_ratio", 0.03)),
        "early_stopping_patience": int(pick("early_stopping_patience", 0)),
    }
    if method != "full":
        rank = int(pick("lora_rank", 16))
        resolved.update(lora_rank=rank, lora_alpha=int(pick("lora_alpha", 2 * rank)), lora_dropout=float(pick("lora_dropout", 0.0)),
                        target_modules=str(pick("target_modules", "all-linear")))
    resolved["total_steps"] = math.ceil(examples / resolved["batch_size"]) * resolved["n_epochs"]
    if resolved["early_stopping_patience"] and not resolved["eval_every"]:
        # Early stopping compares validations: about ten per run unless asked otherwise.
        resolved["eval_every"] = max(1, resolved["total_steps"] // 10)
    return resolved


def public_hyperparameters(resolved: dict, requested: dict) -> dict:
    """The `hyperparameters` object of the API: numbers once known, else what was asked."""
    source = resolved or requested
    return {
        "n_epochs": source.get("n_epochs", "auto"),
        "batch_size": source.get("batch_size", "auto"),
        "learning_rate_multiplier": source.get("learning_rate_multiplier", "auto"),
    }


# How the pages name each resolved setting, and what a 0 means where it means something.
SETTING_LABELS = {
    "n_epochs": "Epochs", "batch_size": "Batch size (examples per step)", "learning_rate_multiplier": "Learning rate multiplier",
    "learning_rate": "Learning rate", "max_seq_len": "Max sequence length", "eval_every": "Evaluate", "save_every": "Checkpoint",
    "warmup_ratio": "Warmup", "early_stopping_patience": "Early stopping", "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout", "target_modules": "LoRA target modules", "total_steps": "Total steps",
}


def describe_setting(name: str, value, *, validation: bool = True) -> str:
    """A resolved setting's value as a person reads it: "at the end", not eval_every 0."""
    if name == "eval_every":
        if not validation:
            return "never (no validation data)"
        return f"every {value} steps and at the end" if value else "at the end"
    if name == "save_every":
        return f"every {value} steps and each epoch" if value else "each epoch"
    if name == "early_stopping_patience":
        return f"after {value} evaluations without a better validation loss" if value else "off"
    if name == "warmup_ratio":
        return f"{value * 100:.4g}% of the steps" if isinstance(value, (int, float)) else str(value)
    return str(value)


def described_settings(resolved: dict, *, validation: bool = True) -> list[tuple[str, str]]:
    """(label, value) for each resolved setting, in the order they were resolved."""
    return [(SETTING_LABELS.get(name, name), describe_setting(name, value, validation=validation))
            for name, value in (resolved or {}).items()]

