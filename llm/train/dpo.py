"""Direct Preference Optimization: the loss, its metrics, and the answers' log-probabilities.

For a pair with policy log-probabilities pc (chosen) and pr (rejected), summed
over the answer tokens, and the same under the reference model, rc and rr:

    reward_chosen   = beta * (pc - rc)
    reward_rejected = beta * (pr - rr)
    loss            = -log sigmoid(reward_chosen - reward_rejected)

(Rafailov et al., 2023, the "sigmoid" loss). A step's loss is the mean over its
pairs. The reference is fixed for the whole run, so its log-probabilities are
computed once, before the first step, in one pass without gradients: no second
model in memory, and no reference forward pass per step.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from .hf import TrainableModel
from .packing import trained_logits
from .preference import PairBatch, RenderedPair, pack_pairs

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")
"""What a DPO step reports besides its loss, each the mean over the step's pairs."""


def answer_logps(model: TrainableModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each pair's chosen and rejected answer, summed over their tokens: ((pairs,), (pairs,))."""
    token_logps = -F.cross_entropy(trained_logits(model, batch).float(), batch.targets, reduction="none")
    sums = torch.zeros(2 * batch.pairs, device=token_logps.device, dtype=token_logps.dtype)
    sums = sums.index_add(0, batch.slots, token_logps)
    return sums[0::2], sums[1::2]


@torch.no_grad()
def reference_logps(
    model: TrainableModel,
    pairs: list[RenderedPair],
    *,
    token_budget: int,
    device: torch.device,
    context: Callable[[], AbstractContextManager[object]] = nullcontext,
    interrupt: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """(2, pairs) chosen and rejected log-probabilities of every pair under the model as it is now.

    context() wraps each forward pass: autocast, and for a fresh adapter peft's disable_adapter(),
    so the reference is the base model itself. interrupt() is called before each batch: it raises to stop.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in pack_pairs(pairs, token_budget):
        interrupt()
        with context():
            pc, pr = answer_logps(model, batch.to(device))
        chosen.append(pc.cpu())
        rejected.append(pr.cpu())
    model.train(was_training)
    return torch.stack([torch.cat(chosen), torch.cat(rejected)])


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, reward of chosen, reward of rejected)."""
    reward_chosen = beta * (policy_chosen - reference_chosen)
    reward_rejected = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(reward_chosen - reward_rejected)
    return losses, reward_chosen, reward_rejected


class PairTotals:
    """Sums over pairs, for the step's or a validation's means."""

    def __init__(self) -> None:
        self.pairs = 0
        self.sums = dict.fromkeys(("loss", *METRICS), 0.0)

    def add(
        self,
        losses: torch.Tensor,
        reward_chosen: torch.Tensor,
        reward_rejected: torch.Tensor,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
    ) -> None:
        values = {
            "loss": losses,
            "rewards_chosen": reward_chosen,
            "rewards_rejected": reward_rejected,
            "reward_margin": reward_chosen - reward_rejected,
            "reward_accuracy": (reward_chosen > reward_rejected).float(),
            "logps_chosen": policy_chosen,
            "logps_rejected": policy_rejected,
        }
        for name, value in values.items():
            self.sums[name] += float(value.detach().sum())
        self.pairs += len(losses)

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + name: total / max(self.pairs, 1) for name, total in self.sums.items()}
