"""Training over several processes: who does what, and the few collectives a step needs.

torchrun starts one process per GPU (or several on a CPU) with RANK, LOCAL_RANK and
WORLD_SIZE set and a rendezvous address (env://). Every rank loads the same data and
the same model, takes its share of every step's examples, and the gradients meet:

- DDP (gloo on CPU, NCCL on CUDA) for adapters everywhere and for full fine-tunes on CPU;
- FSDP2 (`fully_shard`, one unit per decoder layer) for full fine-tunes on GPUs, where
  a full copy of the weights, gradients and AdamW moments per rank would not fit.
  Written and checked on CPU with gloo (FT_DIST_STRATEGY=fsdp); NCCL on GPUs is untested.

Rank 0 alone asks should_stop, reports and writes; the others follow its decisions.
A single process gets `Solo`, whose methods change nothing: that path starts no
process group and computes exactly what it always did.
"""

import math
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Protocol, cast

import torch

from .config import ConfigError, TrainConfig
from .hf import TrainableModel

TIMEOUT_ENV = "FT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
"""How long a rank waits in a collective for the others: longer than rank 0's slowest checkpoint
write, short enough that a rank stuck on a lost peer fails instead of holding its GPU for hours."""
STRATEGY_ENV = "FT_DIST_STRATEGY"
STRATEGIES = ("auto", "ddp", "fsdp")
_STOP_CODES = (None, "pause", "cancel")


def world_size() -> int:
    """How many processes train together, from torchrun's environment (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone): the one that prints, reports and writes."""
    return os.environ.get("RANK", "0") in ("", "0")


class Team(Protocol):
    """The ranks training one run together, as the training loop sees them."""

    rank: int
    world_size: int
    strategy: str
    """"solo", "ddp" or "fsdp"."""

    @property
    def is_main(self) -> bool: ...

    def share(self, indices: list[int]) -> list[int]:
        """This rank's part of a step's examples (all of them when alone); may be empty."""
        ...

    def span(self, count: int) -> range:
        """This rank's part of count items (a validation file), as one contiguous range."""
        ...

    def total(self, count: int) -> int:
        """count summed over the ranks: the step's trained tokens or pairs."""
        ...

    def rounds(self, micro_batches: int) -> int:
        """The most micro-batches any rank has; every rank runs that many (FSDP2's all-gathers pair up)."""
        ...

    def gradient_divisor(self, total: int) -> float:
        """What each rank divides its summed loss by so the averaged gradient is that of sum / total."""
        ...

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        ...

    def decide(self, request: str | None) -> str | None:
        """Rank 0's stop request ("pause", "cancel" or None), on every rank."""
        ...

    def prepare(self, model: TrainableModel, config: TrainConfig) -> TrainableModel:
        """Shard the model in place (FSDP2) before the optimizer sees its parameters."""
        ...

    def forward_model(self, model: TrainableModel) -> TrainableModel:
        """What training forwards run through: the model, or its DDP wrapper that averages gradients."""
        ...

    def gradient_sync(self, last: bool) -> AbstractContextManager[object]:
        """Around a micro-batch's forward and backward: gradients meet only on the step's last one."""
        ...

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients' global norm to max_norm; return the norm before clipping."""
        ...

    def gather(self, value: Any) -> list[Any]:
        """value of every rank, in rank order."""
        ...

    def model_state(self, model: TrainableModel) -> dict[str, torch.Tensor] | None:
        """The full weights to save, gathered on rank 0 (FSDP2); None: save the model as it is."""
        ...

    def optimizer_state(self, model: TrainableModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state, keyed as a one-process run keys it."""
        ...

    def load_optimizer_state(
        self, model: TrainableModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None: ...

    def barrier(self) -> None:
        """Wait for every rank: rank 0's last writes are on disk before any rank returns."""
        ...

    def close(self) -> None: ...


class Solo:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    strategy = "solo"
    is_main = True

    def share(self, indices: list[int]) -> list[int]:
        return indices

    def span(self, count: int) -> range:
        return range(count)

    def total(self, count: int) -> int:
        return count

    def rounds(self, micro_batches: int) -> int:
        return micro_batches

    def gradient_divisor(self, total: int) -> float:
        return total

    def sum(self, values: list[float]) -> list[float]:
        return values

    def decide(self, request: str | None) -> str | None:
        return request

    def prepare(self, model: TrainableModel, config: TrainConfig) -> TrainableModel:
        return model

    def forward_model(self, model: TrainableModel) -> TrainableModel:
        return model

    def gradient_sync(self, last: bool) -> AbstractContextManager[object]:
        return nullcontext()

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def model_state(self, model: TrainableModel) -> dict[str, torch.Tensor] | None:
        return None

    def optimizer_state(self, model: TrainableModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: TrainableModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def join(config: TrainConfig) -> Team:
    """This process's team: Solo outside torchrun, else a Group of WORLD_SIZE ranks (joined here unless the caller did)."""
    if world_size() == 1:
        return Solo()
    return Group(config)


class Group:
    """WORLD_SIZE processes started by torchrun, meeting through torch.distributed."""

    def __init__(self, config: TrainConfig) -> None:
        import torch.distributed as dist

        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        if self.cuda:
            # Before anything touches CUDA: every later "cuda" tensor of this rank lands on its own GPU.
            torch.cuda.set_device(self.local_rank)
        self.strategy = _strategy(config, cuda=self.cuda)
        self.started_group = not dist.is_initialized()
        if self.started_group:
            dist.init_process_group(
                backend="nccl" if self.cuda else "gloo",
                timeout=timedelta(seconds=_timeout_s()),
                device_id=torch.device("cuda", self.local_rank) if self.cuda else None,
            )
        self.device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.sharded: Any = None
        """The model after fully_shard (FSDP2), whose gradient sync is switched per micro-batch."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ----------------------------------------------------------------

    def share(self, indices: list[int]) -> list[int]:
        # Strided, so that a step's examples (shuffled, of mixed lengths) spread evenly.
        return indices[self.rank :: self.world_size]

    def span(self, count: int) -> range:
        per_rank = math.ceil(count / self.world_size)
        return range(min(count, self.rank * per_rank), min(count, (self.rank + 1) * per_rank))

    # --- collectives ---------------------------------------------------------

    def total(self, count: int) -> int:
        import torch.distributed as dist

        summed = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(summed)
        return int(summed.item())

    def rounds(self, micro_batches: int) -> int:
        import torch.distributed as dist

        most = torch.tensor([micro_batches], dtype=torch.int64, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    def gradient_divisor(self, total: int) -> float:
        # DDP and FSDP2 average gradients over the ranks; multiplying each rank's loss by
        # world_size turns that average into the sum over every trained token of the step.
        return total / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return [float(value) for value in summed.tolist()]

    def decide(self, request: str | None) -> str | None:
        import torch.distributed as dist

        code = torch.tensor([_STOP_CODES.index(request)], dtype=torch.int64, device=self.device)
        dist.broadcast(code, src=0)
        return _STOP_CODES[int(code.item())]

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # --- the model -----------------------------------------------------------

    def prepare(self, model: TrainableModel, config: TrainConfig) -> TrainableModel:
        if self.strategy != "fsdp":
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        module = cast(torch.nn.Module, model)
        # bf16 all-gathers and compute on GPUs, fp32 master weights and gradient reduction.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.cuda else None
        options: dict[str, Any] = {"mp_policy": policy} if policy else {}
        units = set(getattr(model, "_no_split_modules", None) or [])
        for submodule in module.modules():
            if type(submodule).__name__ in units:
                fully_shard(submodule, **options)
        fully_shard(module, **options)
        self.sharded = cast(Any, model)
        return model

    def forward_model(self, model: TrainableModel) -> TrainableModel:
        if self.strategy == "fsdp":
            return model
        if self.ddp is None:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                cast(torch.nn.Module, model),
                device_ids=[self.local_rank] if self.cuda else None,
                forward_sync_buffers=False,  # rotary tables and the like are the same on every rank
            )
        return cast(TrainableModel, self.ddp)

    def gradient_sync(self, last: bool) -> AbstractContextManager[object]:
        if self.sharded is not None:
            self.sharded.set_requires_gradient_sync(last)
            return nullcontext()
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return nullcontext()

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        if self.strategy != "fsdp":
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):  # each rank holds a shard's part: the global norm needs all of them
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def model_state(self, model: TrainableModel) -> dict[str, torch.Tensor] | None:
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            cast(torch.nn.Module, model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if getattr(model.config, "tie_word_embeddings", False):
            # Gathered as separate tensors, tied weights would be saved twice; the model re-ties them on load.
            for tied in getattr(model, "_tied_weights_keys", None) or ():
                state.pop(tied, None)
        return cast(dict[str, torch.Tensor], state)

    def optimizer_state(self, model: TrainableModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()  # under DDP the same on every rank
        if self.strategy != "fsdp":
            return state
        from torch.distributed.tensor import DTensor

        # Each rank holds its shard of every moment: gathered whole (every rank, same order), the
        # checkpoint is the one a single process writes and any number of processes resumes.
        return {
            **state,
            "state": {
                position: {
                    name: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                    for name, value in moments.items()
                }
                for position, moments in state["state"].items()
            },
        }

    def load_optimizer_state(
        self, model: TrainableModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if self.strategy == "fsdp":
            state = self._sharded_like_the_parameters(optimizer, state)
        optimizer.load_state_dict(state)

    def _sharded_like_the_parameters(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        """Whole moments (as a checkpoint holds them) cut into this rank's shards of their parameters."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]

        def shard(position: int, value: Any) -> Any:
            param = params[position]
            if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.shape != param.shape:
                return value  # AdamW's step count, and anything already local
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)

        return {
            **state,
            "state": {
                position: {name: shard(position, value) for name, value in moments.items()}
                for position, moments in state["state"].items()
            },
        }

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        self.ddp = self.sharded = None
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()


def _strategy(config: TrainConfig, *, cuda: bool) -> str:
    asked = os.environ.get(STRATEGY_ENV, "auto").strip().lower() or "auto"
    if asked not in STRATEGIES:
        raise ConfigError([f"{STRATEGY_ENV}: must be one of {', '.join(STRATEGIES)}, got {asked!r}"])
    if asked != "auto":
        if asked == "fsdp" and config.method != "full":
            raise ConfigError([f"{STRATEGY_ENV}: fsdp shards full fine-tunes only; method {config.method} uses ddp"])
        return asked
    return "fsdp" if cuda and config.method == "full" else "ddp"


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError([f"{TIMEOUT_ENV}: must be a number of seconds > 0, got {text!r}"])
    return seconds
