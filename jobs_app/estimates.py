"""What a job will cost before it runs: resolved settings, tokens, price and time."""

from statistics import median

from django.conf import settings

from datasets_app.models import Dataset
from datasets_app.token_stats import billable_tokens_at
from deployments_app.models import ModelCard

from .hyperparameters import resolve_hyperparameters

# Non-pad tokens per second when no finished job on this server says better
# (CPU figures; a GPU worker's jobs replace them as soon as one finishes).
_FALLBACK_TOKENS_PER_SECOND = {"tiny-random-smollm2": 2000.0, "SmolLM2-135M-Instruct": 120.0}


def expected_tokens_per_second(base_model: str, method: str, objective: str = "sft") -> tuple[float, str]:
    # DPO runs apart: each step also runs the reference model over the pair.
    cards = ModelCard.objects.filter(base_model=base_model, method=method, objective=objective)
    measured = [
        m["tokens_per_second"] for m in cards.values_list("metrics", flat=True)[:20] if m and m.get("tokens_per_second")
    ]
    if measured:
        return median(measured), f"median of {len(measured)} finished job(s) here"
    return _FALLBACK_TOKENS_PER_SECOND.get(base_model, 100.0), "a default for this model on CPU"


def estimate_job(*, dataset: Dataset, base_model: str, method: str, requested: dict, objective: str = "sft") -> dict:
    """Resolved hyperparameters plus token, cost and time estimates for one training file.

    A preference pair counts as DPO runs it, which its token statistics already say
    (datasets_app.token_stats): its prompt once, then both answers.
    """
    resolved = resolve_hyperparameters(requested, method=method, examples=dataset.examples or 0, objective=objective)
    tokens = (dataset.report or {}).get("tokens") or {}
    per_epoch = billable_tokens_at(tokens, resolved["max_seq_len"]) if "error" not in tokens else None
    counted = per_epoch is not None
    if not counted:
        per_epoch = int(dataset.bytes / 4)  # rough until the tokenizer pass has run
    total = per_epoch * resolved["n_epochs"]
    speed, basis = expected_tokens_per_second(base_model, method, objective)
    price = settings.FT_PRICE_PER_1K_TOKENS
    return {
        "resolved": resolved,
        "objective": objective,
        "tokens_per_epoch": per_epoch,
        "tokens_counted": counted,
        "total_tokens": total,
        "cost": total / 1000 * price,
        "price_per_1k_tokens": price,
        "seconds": total / speed if speed else None,
        "speed": speed,
        "speed_basis": basis,
    }
