"""The one metrics publisher: rows for history, the channel layer for live pages."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def job_group(public_id: str) -> str:
    return f"job-{public_id}"


def publish(public_id: str, payload: dict) -> None:
    """Send payload to every page watching the job; never let a Redis hiccup stop training."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(job_group(public_id), {"type": "job.update", "payload": payload})
    except Exception:  # the live view is best effort (any channel-layer fault), the rows are the record
        log.warning("could not publish to %s", job_group(public_id), exc_info=True)


DPO_METRICS = (
    "reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
    "logps_chosen",
    "logps_rejected",
)
"""A DPO run's reward and log-probability metrics. Points store them prefixed train_ or valid_, as
OpenAI's checkpoint metrics name theirs; only DPO payloads carry them, so SFT points stay as they were."""


def _dpo_metrics(payload: dict, *, engine_prefix: str, prefix: str) -> dict:
    return {f"{prefix}{name}": payload[engine_prefix + name] for name in DPO_METRICS if engine_prefix + name in payload}


def metrics_event_data(kind: str, payload: dict) -> dict:
    """Both SDK vocabularies in one dict (openai and zhipuai read different names), plus DPO's rewards."""
    if kind == "eval":
        return {
            "step": payload["step"],
            "valid_loss": payload.get("eval_loss"),
            "valid_mean_token_accuracy": payload.get("eval_token_accuracy"),
            "full_valid_loss": payload.get("eval_loss"),
            "full_valid_mean_token_accuracy": payload.get("eval_token_accuracy"),
            "current_steps": payload["step"],
            "eval_loss": payload.get("eval_loss"),
            "eval_acc": payload.get("eval_token_accuracy"),
            **_dpo_metrics(payload, engine_prefix="eval_", prefix="valid_"),
        }
    return {
        "step": payload["step"],
        "total_steps": payload.get("total_steps"),
        "train_loss": payload.get("loss"),
        "train_mean_token_accuracy": payload.get("token_accuracy"),
        "epoch": payload.get("epoch"),
        "current_steps": payload["step"],
        "loss": payload.get("loss"),
        "acc": payload.get("token_accuracy"),
        "learning_rate": payload.get("lr"),
        "grad_norm": payload.get("grad_norm"),
        "trained_tokens": payload.get("tokens"),
        "tokens_per_second": payload.get("tokens_per_second"),
        "elapsed_time": payload.get("elapsed_s"),
        "remaining_time": payload.get("eta_s"),
        **_dpo_metrics(payload, engine_prefix="", prefix="train_"),
    }
