"""Every hyperparameter a user may set, defined once: name, type, bounds, auto rule, doc.

The create form, the API (its validation and its OpenAPI schema), the job pages'
estimates and `TrainConfig.problems()` all read these definitions. Names are
OpenAI's (`n_epochs`, `learning_rate_multiplier`, ...); `to_engine` is the one
place they become `TrainConfig`'s (`epochs`, `lr`, ...).

    cleaned, problems = check({"n_epochs": 3, "batch_size": "auto"})
    resolved = resolve(cleaned, method="lora", examples=40)
    TrainConfig(model=..., train_file=..., out_dir=..., **to_engine(resolved))
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Value = int | float | str
"""A resolved hyperparameter."""
Requested = int | float | str
"""A checked request: a value, or the string "auto"."""

T = TypeVar("T", int, float, str)

BASE_LEARNING_RATE: dict[str, float] = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5}
"""The learning rate each method starts from; learning_rate_multiplier scales it."""


@dataclass(frozen=True)
class AutoContext:
    """What an auto rule may look at."""

    method: str
    """lora, dora, full or qlora."""
    examples: int
    """Conversations (or preference pairs) in the training file."""
    resolved: Mapping[str, Value]
    """The hyperparameters resolved before this one (HYPERPARAMETERS order)."""


@dataclass(frozen=True)
class Problem:
    """One refused hyperparameter: its public name and the sentence that says why."""

    name: str
    message: str


@dataclass(frozen=True)
class Hyperparameter(Generic[T]):
    """One hyperparameter, as the form, the API, the schema and the engine all see it."""

    name: str
    """The public (OpenAI) name: the key in `hyperparameters`, the form field, the schema property."""
    label: str
    """What the create form calls it."""
    doc: str
    """One line for the form's help text and the API schema."""
    type: type[T]
    """int, float or str; JSON numbers are checked against it."""
    default: T
    """The value with nothing to go by: TrainConfig's default, and "auto" where no rule refines it."""
    minimum: T | None = None
    """Smallest value allowed (inclusive); None for text."""
    maximum: T | None = None
    """Largest value allowed (inclusive); None for text."""
    auto: Callable[[AutoContext], T] | None = None
    """How "auto" is chosen from the data and the method; None means `default`."""
    auto_doc: str = ""
    """The auto rule in words, for people; empty means the default as written."""
    engine_name: str | None = None
    """The TrainConfig field it becomes; None when the engine takes something derived from it."""
    adapter_only: bool = False
    """Meaningful only for the adapter methods (lora, dora, qlora), never for full."""
    objectives: tuple[str, ...] = ("sft", "dpo")
    """The objectives it means something for: sft (supervised), dpo (preference pairs), or both."""
    accepts_auto: bool = True
    """Whether "auto" (or null) may stand for the value."""
    is_valid_text: Callable[[str], bool] | None = None
    """For text: whether a value is acceptable."""
    expected_text: str = ""
    """For text: what an acceptable value looks like, to complete "must be ..."."""

    def auto_value(self, context: AutoContext) -> T:
        """The value "auto" stands for here."""
        return self.default if self.auto is None else self.auto(context)

    def auto_description(self) -> str:
        return self.auto_doc or str(self.default)

    def public_problem(self, value: object) -> str | None:
        """Why the API and the form refuse this value (naming the hyperparameter), or None."""
        if self.type is str:
            if not self._text_ok(value):
                return f"{self.name} must be {self.expected_text}, got {value!r}."
            return None
        if not _is_number(value) or (self.type is int and not _is_whole(value)):
            expected = ("an integer" if self.type is int else "a number") + (' or "auto"' if self.accepts_auto else "")
            return f"{self.name} must be {expected}, got {value!r}."
        if not self._in_bounds(value):
            return f"{self.name} must be between {self.minimum} and {self.maximum}, got {value}."
        return None

    def engine_problem(self, value: object) -> str | None:
        """Why TrainConfig refuses this value (its field names itself), or None."""
        if self.type is str:
            return None if self._text_ok(value) else f"must be {self.expected_text}, got {value!r}"
        kind = "a whole number" if self.type is int else "a number"
        # The engine takes exact types: a float epoch count is a caller's bug, not a value to round.
        typed = _is_number(value) and (self.type is not int or isinstance(value, int))
        if not typed or (self.minimum is not None and _below(value, self.minimum)):
            return f"must be {kind} >= {self.minimum}, got {value!r}"
        if self.maximum is not None and _below(self.maximum, value):
            return f"must be {kind} <= {self.maximum}, got {value!r}"
        return None

    def clean(self, value: Any) -> T:
        """An accepted value in its own type (3.0 becomes 3 for an integer; text is stripped)."""
        if isinstance(value, str):
            return self.type(value.strip())
        return self.type(value)

    def _text_ok(self, value: object) -> bool:
        return isinstance(value, str) and (self.is_valid_text is None or self.is_valid_text(value))

    def _in_bounds(self, value: object) -> bool:
        low_ok = self.minimum is None or not _below(value, self.minimum)
        high_ok = self.maximum is None or not _below(self.maximum, value)
        return low_ok and high_ok


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _below(value: object, limit: object) -> bool:
    return isinstance(value, (int, float)) and isinstance(limit, (int, float)) and value < limit


def _module_names(text: str) -> bool:
    # Names reach peft and the run's config file; letters, digits, "_", "." and "-" are all a module path needs.
    parts = text.split(",")
    return bool(text.strip()) and all(
        part.strip().replace("_", "").replace(".", "").replace("-", "").isalnum() for part in parts
    )


def _epochs_for(context: AutoContext) -> int:
    # Small sets need more passes to move the model; large sets fewer.
    if context.examples < 80:
        return max(1, min(10, math.ceil(240 / max(context.examples, 1))))
    return 3


def _batch_size_for(context: AutoContext) -> int:
    return max(1, min(8, context.examples // 8 or 1))


def _alpha_for(context: AutoContext) -> int:
    return 2 * int(context.resolved["lora_rank"])


N_EPOCHS = Hyperparameter(
    name="n_epochs",
    label="Epochs",
    doc="Passes over the training data.",
    type=int,
    default=3,
    minimum=1,
    maximum=50,
    auto=_epochs_for,
    auto_doc="3; more for sets under 80 examples (240 / examples, at most 10)",
    engine_name="epochs",
)
BATCH_SIZE = Hyperparameter(
    name="batch_size",
    label="Batch size",
    doc="Examples per optimizer step.",
    type=int,
    default=8,
    minimum=1,
    maximum=256,
    auto=_batch_size_for,
    auto_doc="examples / 8, between 1 and 8",
    engine_name="batch_size",
)
LEARNING_RATE_MULTIPLIER = Hyperparameter(
    name="learning_rate_multiplier",
    label="Learning rate multiplier",
    doc="Scales the method's base learning rate (2e-4 for LoRA, DoRA and QLoRA; 2e-5 for full).",
    type=float,
    default=1.0,
    minimum=1e-4,
    maximum=100.0,
    engine_name=None,  # the engine takes the learning rate it produces: see to_engine
)
MAX_SEQ_LEN = Hyperparameter(
    name="max_seq_len",
    label="Max sequence length",
    doc="Longer examples are cut to this many tokens.",
    type=int,
    default=1024,
    minimum=32,
    maximum=32768,
    engine_name="max_seq_len",
)
EVAL_EVERY = Hyperparameter(
    name="eval_every",
    label="Evaluate every N steps",
    doc="Validate every N optimizer steps; 0 validates only at the end.",
    type=int,
    default=0,
    minimum=0,
    maximum=1_000_000,
    auto_doc="0 (at the end); about ten validations a run when early stopping is on",
    engine_name="eval_every",
)
SAVE_EVERY = Hyperparameter(
    name="save_every",
    label="Checkpoint every N steps",
    doc="Checkpoint every N optimizer steps; 0 only at the end of each epoch.",
    type=int,
    default=0,
    minimum=0,
    maximum=1_000_000,
    auto_doc="0 (each epoch)",
    engine_name="save_every",
)
WARMUP_RATIO = Hyperparameter(
    name="warmup_ratio",
    label="Warmup ratio",
    doc="Share of the steps spent ramping the learning rate up to its peak.",
    type=float,
    default=0.03,
    minimum=0.0,
    maximum=0.5,
    engine_name="warmup_ratio",
)
EARLY_STOPPING_PATIENCE = Hyperparameter(
    name="early_stopping_patience",
    label="Early stopping patience",
    doc="Stop after N validations without a lower validation loss; 0 never stops early.",
    type=int,
    default=0,
    minimum=0,
    maximum=1000,
    auto_doc="0 (off)",
    engine_name="early_stopping_patience",
)
LORA_RANK = Hyperparameter(
    name="lora_rank",
    label="LoRA rank",
    doc="Rank of the adapter's update matrices.",
    type=int,
    default=16,
    minimum=1,
    maximum=256,
    engine_name="lora_r",
    adapter_only=True,
)
LORA_ALPHA = Hyperparameter(
    name="lora_alpha",
    label="LoRA alpha",
    doc="LoRA scaling numerator: updates are scaled by alpha / rank.",
    type=int,
    default=32,
    minimum=1,
    maximum=1024,
    auto=_alpha_for,
    auto_doc="2 x rank",
    engine_name="lora_alpha",
    adapter_only=True,
)
LORA_DROPOUT = Hyperparameter(
    name="lora_dropout",
    label="LoRA dropout",
    doc="Dropout on the adapter's input; 0 skips it.",
    type=float,
    default=0.0,
    minimum=0.0,
    maximum=0.9,
    engine_name="lora_dropout",
    adapter_only=True,
)
TARGET_MODULES = Hyperparameter(
    name="target_modules",
    label="LoRA target modules",
    doc="Layers that get adapters: all-linear, or names such as q_proj,v_proj.",
    type=str,
    default="all-linear",
    engine_name="target_modules",
    adapter_only=True,
    is_valid_text=_module_names,
    expected_text='"all-linear" or a comma-separated list of module names',
)

BETA = Hyperparameter(
    name="beta",
    label="DPO beta",
    doc="How far preference tuning may move from the reference model: higher keeps it closer.",
    type=float,
    default=0.1,
    minimum=0.001,
    maximum=2.0,
    engine_name="dpo_beta",
    objectives=("dpo",),
)

HYPERPARAMETERS: tuple[Hyperparameter[Any], ...] = (
    N_EPOCHS,
    BATCH_SIZE,
    LEARNING_RATE_MULTIPLIER,
    MAX_SEQ_LEN,
    EVAL_EVERY,
    SAVE_EVERY,
    WARMUP_RATIO,
    EARLY_STOPPING_PATIENCE,
    LORA_RANK,
    LORA_ALPHA,
    LORA_DROPOUT,
    TARGET_MODULES,
    BETA,
)
"""Every user hyperparameter, in the order they resolve and are shown."""

BY_NAME: dict[str, Hyperparameter[Any]] = {definition.name: definition for definition in HYPERPARAMETERS}

ENGINE_NAMES: dict[str, str] = {
    **{definition.name: definition.engine_name for definition in HYPERPARAMETERS if definition.engine_name},
    "learning_rate": "lr",  # derived in resolve(): the base rate of the method times the multiplier
}
"""Resolved name -> TrainConfig field: the one mapping of OpenAI's names to the engine's."""


def check(requested: Mapping[str, object]) -> tuple[dict[str, Requested], list[Problem]]:
    """The requested values cleaned (None becomes "auto"), and every problem, each naming its hyperparameter."""
    cleaned: dict[str, Requested] = {}
    problems: list[Problem] = []
    for name, value in requested.items():
        definition = BY_NAME.get(name)
        if definition is None:
            allowed = ", ".join(sorted(BY_NAME))
            problems.append(Problem(name, f"Unknown hyperparameter {name!r}; expected one of {allowed}."))
        elif value is None or value == "auto":
            cleaned[name] = "auto"
        elif (message := definition.public_problem(value)) is not None:
            problems.append(Problem(name, message))
        else:
            cleaned[name] = definition.clean(value)
    return cleaned, problems


def resolve(
    requested: Mapping[str, Requested], *, method: str, examples: int, objective: str = "sft"
) -> dict[str, Value]:
    """Every hyperparameter as a number (or text): "auto" and missing ones from their rules.

    Adds `learning_rate` (the method's base rate times the multiplier) and `total_steps`.
    Hyperparameters of another method or objective (LoRA rank for full, beta for sft) are left out.
    """
    resolved: dict[str, Value] = {}
    for definition in HYPERPARAMETERS:
        if (definition.adapter_only and method == "full") or objective not in definition.objectives:
            continue
        value = requested.get(definition.name, "auto")
        context = AutoContext(method=method, examples=examples, resolved=resolved)
        resolved[definition.name] = definition.auto_value(context) if value == "auto" else definition.clean(value)
        if definition is LEARNING_RATE_MULTIPLIER:
            resolved["learning_rate"] = BASE_LEARNING_RATE[method] * float(resolved[definition.name])
    batch_size, epochs = int(resolved[BATCH_SIZE.name]), int(resolved[N_EPOCHS.name])
    total_steps = math.ceil(examples / batch_size) * epochs
    resolved["total_steps"] = total_steps
    if resolved[EARLY_STOPPING_PATIENCE.name] and not resolved[EVAL_EVERY.name]:
        # Early stopping compares validations: about ten per run unless asked otherwise.
        resolved[EVAL_EVERY.name] = max(1, total_steps // 10)
    return resolved


def to_engine(resolved: Mapping[str, Value]) -> dict[str, Value]:
    """TrainConfig keyword arguments from resolved hyperparameters; names the engine has no field for are left out."""
    return {ENGINE_NAMES[name]: value for name, value in resolved.items() if name in ENGINE_NAMES}
