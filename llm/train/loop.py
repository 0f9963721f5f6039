"""The training loop: setup, then fit step by step, validating and checkpointing along the way.

A step takes the next batch_size examples of the epoch's order, packs them
into micro-batches of at most a token budget, and accumulates gradients so
that the step's loss is the mean over every trained token of the step.
"""

import gc
import json
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed, dpo
from .config import ConfigError, TrainConfig
from .data import ExampleSet, RenderedExample, epoch_order, load_examples
from .hf import TrainableModel
from .modeling import (
    count_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    place,
    plan_memory,
    save_weights,
    use_cpu_threads,
)
from .packing import pack, trained_logits
from .preference import PairSet, RenderedPair, load_pairs, pack_pairs

Sink = Callable[[str, dict[str, Any]], None]
"""sink(kind, payload): where events, metrics, evaluations, checkpoints (saved and removed) and the summary go."""
MAX_CHECKPOINTS_PER_RUN = 100
"""save_every is raised so that a run writes at most this many checkpoints: each costs a full write."""
ShouldStop = Callable[[], object]
"""Asked before every optimizer step: falsy continues, "pause" pauses, anything else cancels."""
Batch = TypeVar("Batch")
Item = TypeVar("Item")


def get_lr(step: int, *, lr: float, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine, linear or constant."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(config: TrainConfig, sink: Sink | None = None, should_stop: ShouldStop | None = None) -> dict[str, Any]:
    """Fine-tune config.model on config.train_file and return the summary.

    sink(kind, payload) receives "event", "metric", "eval", "checkpoint" and
    "summary" calls. should_stop() is asked before every optimizer step: a
    falsy answer continues, "cancel" (or True) stops at once, "pause" saves a
    checkpoint first. Raises ConfigError listing every problem with the config or data.
    """
    config.check()
    team = distributed.join(config)  # Solo unless torchrun started several processes
    run = _Run(config, sink or (lambda kind, payload: None), should_stop or (lambda: None), team)
    try:
        try:
            summary = run.main()
        except _Interrupted as stop:
            summary = run.stopped_before_training(stop.request)
        team.barrier()
        return summary
    finally:
        run.release()
        team.close()


class _Interrupted(Exception):
    """should_stop answered while the run was still reading data or computing its reference."""

    def __init__(self, request: str) -> None:
        super().__init__(request)
        self.request = request


class _Progress(TypedDict):
    """How far the run got; saved in every checkpoint and restored on resume."""

    step: int
    epoch: int
    index: int
    """The next example in this epoch's order."""
    tokens: int
    train_seconds: float
    elapsed_s: float
    best_eval_loss: float
    stale_evals: int
    checkpoint_evals: dict[int, float]
    """Checkpoint step -> the validation loss known when it was saved (retention keeps the lowest)."""


class _Latest(TypedDict):
    """The last training metric and evaluation reported (None before the first)."""

    train: dict[str, float] | None
    eval: dict[str, float] | None


class _StepResult(TypedDict):
    loss: float
    grad_norm: float
    tokens: int
    metrics: dict[str, float]
    """What the objective reports besides the loss: token_accuracy (sft), rewards and log-probabilities (dpo)."""


class _Run:
    """One call of train(): what it loaded and how far it got."""

    # Set by main(); release() drops the big three (they are unset if main() failed before loading them).
    model: TrainableModel
    optimizer: torch.optim.AdamW
    params: list[torch.nn.Parameter]
    reference: dict[str, torch.Tensor]
    """dpo only: (2, pairs) reference log-probabilities of the chosen and rejected answers, per file."""

    def __init__(self, config: TrainConfig, sink: Sink, should_stop: ShouldStop, team: distributed.Team) -> None:
        self.config = config
        self.team = team
        # Rank 0 alone reports; the other ranks train their share and stay silent.
        self.sink = sink if team.is_main else (lambda kind, payload: None)
        self.should_stop = should_stop
        self.out = Path(config.out_dir).resolve()

    # --- setup ---------------------------------------------------------------

    def main(self) -> dict[str, Any]:
        config = self.config
        self.started = time.monotonic()
        self.placement = place(config)
        if self.placement.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.placement.device)
        threads = use_cpu_threads()
        self.tokenizer = load_tokenizer(config.model)
        if not self.tokenizer.chat_template:
            raise ConfigError([f"model: {config.model} has no chat template to render conversations with"])
        self.train_set, self.val_set = self._load_data()

        resumed = ckpt.load_state(config.resume_from) if config.resume_from else None
        if resumed:
            self._check_resumable(resumed)
        torch.manual_seed(config.seed)
        self.model = load_model(config, self.placement, checkpoint=config.resume_from)
        if self.team.rank:  # the same adapter everywhere, but each rank its own dropout masks
            torch.manual_seed(config.seed + self.team.rank)
        self.micro_batch_tokens, checkpointing = plan_memory(config, self.model, self.placement)
        if config.objective == "dpo":
            # Before checkpointing is on and before any step: the model as it starts is the reference.
            self.reference = resumed["reference_logps"] if resumed else self._reference_logps()
        if checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model = self.team.prepare(self.model, config)
        self.forward_model = self.team.forward_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.params, config, self.placement.device)

        self.steps_per_epoch = math.ceil(len(self.train_set.examples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)
        self.progress = _Progress(
            step=0,
            epoch=0,
            index=0,
            tokens=0,
            train_seconds=0.0,
            elapsed_s=0.0,
            best_eval_loss=math.inf,
            stale_evals=0,
            checkpoint_evals={},
        )
        self.save_every = self._save_every()
        self.checkpoint_bytes = 0
        self.early_stopped = False
        self.latest = _Latest(train=None, eval=None)
        if resumed:
            self._resume(resumed)

        trainable, total = count_parameters(self.model)
        self.trainable_params, self.total_params = trainable, total
        self._write_config(threads, checkpointing)
        self._event(
            f"{config.method} on {self.placement.device.type} ({threads} threads): {trainable:,} of {total:,} "
            f"parameters trainable; {self.total_steps} steps of {config.batch_size} examples, "
            f"micro-batches of up to {self.micro_batch_tokens} tokens"
            + (", gradient checkpointing on" if checkpointing else "")
            + (
                f"; {self.team.world_size} processes ({self.team.strategy}), each training its share of every step"
                if self.team.world_size > 1
                else ""
            )
        )
        stopped = self.fit()
        return self._finish(stopped)

    def _load_data(self) -> tuple[ExampleSet | PairSet, ExampleSet | PairSet | None]:
        config, problems = self.config, []
        sets: dict[str, ExampleSet | PairSet | None] = {}
        for name, path in (("train_file", config.train_file), ("validation_file", config.validation_file)):
            if path is None:
                sets[name] = None
                continue
            try:
                if config.objective == "dpo":
                    sets[name] = load_pairs(
                        path,
                        self.tokenizer,
                        max_seq_len=config.max_seq_len,
                        name=name,
                        interrupt=self._interrupt,
                        spill_dir=self.out,
                    )
                else:
                    sets[name] = load_examples(
                        path,
                        self.tokenizer,
                        loss_on=config.loss_on,
                        max_seq_len=config.max_seq_len,
                        name=name,
                        interrupt=self._interrupt,
                        spill_dir=self.out,  # the tokens' temporary files: on the run's disk, gone when it ends
                    )
            except ConfigError as error:
                problems += error.problems
        for name, examples in sets.items():
            if examples is not None and not examples.examples:
                problems.append(f"{name}: no example has a token to train on (every reply has weight 0?)")
        if problems:
            raise ConfigError(problems)
        for name, examples in sets.items():
            if examples is None:
                continue
            noun = "preference pairs" if config.objective == "dpo" else "examples"
            self._event(f"{name}: {len(examples.examples)} {noun}, {examples.tokens:,} tokens")
            if examples.truncated_examples:
                self._event(
                    f"{name}: {examples.truncated_examples} examples were longer than max_seq_len={config.max_seq_len} and were cut",
                    "warn",
                )
            if examples.skipped_examples:
                self._event(
                    f"{name}: {examples.skipped_examples} examples have no trained token and are left out", "warn"
                )
        train_set = sets["train_file"]
        assert train_set is not None  # train_file is a required path
        return train_set, sets["validation_file"]

    def _reference_logps(self) -> dict[str, torch.Tensor]:
        """The reference model's log-probabilities of every answer, train and validation, computed once.

        A fresh adapter's reference is the base with the adapter switched off; a run that
        starts from an earlier fine-tune (init_from) or trains every weight has its own
        starting weights as the reference. No copy of the model is kept either way.
        """
        started = time.monotonic()
        config = self.config
        switch_off = config.uses_adapter and config.init_from is None

        @contextmanager
        def reference() -> Iterator[None]:
            with self._autocast(), self.model.disable_adapter() if switch_off else nullcontext():
                yield

        found = {}
        for name, pairs in (("train", self.train_set), ("validation", self.val_set)):
            if pairs is not None:
                found[name] = dpo.reference_logps(
                    self.model,
                    cast(list[RenderedPair], pairs.examples),
                    token_budget=self.micro_batch_tokens,
                    device=self.placement.device,
                    context=reference,
                    interrupt=self._interrupt,
                )
        what = "the base model with the adapter switched off" if switch_off else "the starting weights"
        self._event(
            f"Reference log-probabilities of {sum(t.shape[1] for t in found.values())} pairs from {what}, "
            f"in {time.monotonic() - started:.1f} s"
        )
        return found

    def _check_resumable(self, state: dict[str, Any]) -> None:
        problems = []
        objective = state["config"].get("objective", "sft")
        if objective != self.config.objective:
            problems.append(f"resume_from: the checkpoint is from a {objective} run, not {self.config.objective}")
        if state["config"]["method"] != self.config.method:
            problems.append(
                f"resume_from: the checkpoint is from a {state['config']['method']} run, not {self.config.method}"
            )
        if state["train_examples"] != len(self.train_set.examples):
            problems.append(
                f"resume_from: the checkpoint was trained on {state['train_examples']} examples, "
                f"the train file now has {len(self.train_set.examples)}"
            )
        if problems:
            raise ConfigError(problems)

    def _resume(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.team.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:  # an older checkpoint, kept without it by retention: resumable, with fresh moments
            self._event(
                f"{self.config.resume_from} holds no optimizer state (only the newest checkpoint keeps it): "
                "AdamW's moments start afresh",
                "warn",
            )
        # Each rank continues its own random stream where it was saved; a rank the checkpoint
        # did not have (resumed on more processes) keeps the one it was seeded with.
        saved_by_rank = state.get("rng_by_rank") or [state["rng"]]
        if self.team.rank < len(saved_by_rank):
            ckpt.restore_rng(saved_by_rank[self.team.rank])
        start = self.progress  # what a checkpoint from before a field existed continues with
        on_disk = set(ckpt.checkpoint_steps(self.out))  # retention may have removed some since it was saved
        self.progress = _Progress(
            step=state.get("step", start["step"]),
            epoch=state.get("epoch", start["epoch"]),
            index=state.get("index", start["index"]),
            tokens=state.get("tokens", start["tokens"]),
            train_seconds=state.get("train_seconds", start["train_seconds"]),
            elapsed_s=state.get("elapsed_s", start["elapsed_s"]),
            best_eval_loss=state.get("best_eval_loss", start["best_eval_loss"]),
            stale_evals=state.get("stale_evals", start["stale_evals"]),
            checkpoint_evals={
                step: loss
                for step, loss in state.get("checkpoint_evals", start["checkpoint_evals"]).items()
                if step in on_disk
            },
        )
        self.latest = state["metrics"]
        if self.team.is_main:
            self._trim_metrics_file(state["step"])
        self._event(f"Resumed from step {state['step']} ({self.config.resume_from})")

    # --- fit -----------------------------------------------------------------

    def fit(self) -> str | None:
        """Train until the last epoch ends or should_stop asks to stop; return None, "cancel" or "pause"."""
        config, progress = self.config, self.progress
        examples = self.train_set.examples
        self.session: dict[str, float] = {"started": time.monotonic(), "steps": 0, "tokens": 0, "seconds": 0.0}
        while progress["epoch"] < config.epochs:
            order = epoch_order(len(examples), seed=config.seed, epoch=progress["epoch"])
            while progress["index"] < len(order):
                request = self._stop_request()
                if request == "cancel":
                    self._event(f"Cancelled before step {progress['step'] + 1}")
                    return "cancel"
                if request == "pause":
                    self._save_checkpoint()
                    self._event(f"Paused after step {progress['step']}")
                    return "pause"

                indices = order[progress["index"] : progress["index"] + config.batch_size]
                own = self.team.share(indices)
                # A rank left without examples (a short last step) still runs one, weighted 0:
                # its gradients must meet the others'.
                counted = bool(own)
                own = own or indices[:1]
                batch = cast(list[RenderedExample] | list[RenderedPair], [examples[i] for i in own])
                lr = get_lr(
                    progress["step"],
                    lr=config.lr,
                    total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps,
                    scheduler=config.scheduler,
                )
                step_start = time.monotonic()
                result = self.train_step(batch, lr, own, counted=counted)
                seconds = time.monotonic() - step_start

                progress["step"] += 1
                progress["index"] += len(indices)
                progress["tokens"] += result["tokens"]
                progress["train_seconds"] += seconds
                self.session["steps"] += 1
                self.session["tokens"] += result["tokens"]
                self.session["seconds"] += seconds
                epoch_done = progress["index"] >= len(order)
                if epoch_done:
                    progress["epoch"] += 1
                    progress["index"] = 0
                step = progress["step"]
                metric = self._metric(result, lr, epoch_size=len(order))
                self.latest["train"] = metric
                if step % config.log_every == 0 or step == self.total_steps:
                    self._report("metric", metric)
                # The last step validates here, so its checkpoint carries the final validation numbers.
                if self.val_set and ((config.eval_every and step % config.eval_every == 0) or step == self.total_steps):
                    evaluation = self.validate()
                    if self._patience_ran_out(evaluation["eval_loss"]):
                        self._save_checkpoint()
                        return None
                if epoch_done or (self.save_every and step % self.save_every == 0):
                    self._save_checkpoint()
                if epoch_done:
                    break
        return None

    def _patience_ran_out(self, loss: float) -> bool:
        """Track the best validation loss; True once it has not improved for `patience` validations."""
        progress, patience = self.progress, self.config.early_stopping_patience
        if loss < progress["best_eval_loss"]:
            progress["best_eval_loss"], progress["stale_evals"] = loss, 0
        else:
            progress["stale_evals"] += 1
        if not patience or progress["stale_evals"] < patience:
            return False
        self.early_stopped = True
        self._event(
            f"Early stopping at step {progress['step']}: validation loss has not improved for {patience} "
            f"validations (best {progress['best_eval_loss']:.4f})."
        )
        return True

    def _metric(self, result: _StepResult, lr: float, *, epoch_size: int) -> dict[str, float]:
        progress, session, now = self.progress, self.session, time.monotonic()
        return {
            "step": progress["step"],
            "total_steps": self.total_steps,
            "epoch": progress["epoch"] + progress["index"] / epoch_size,
            "loss": result["loss"],
            "lr": lr,
            "grad_norm": result["grad_norm"],
            "tokens": progress["tokens"],
            "tokens_per_second": session["tokens"] / max(session["seconds"], 1e-9),
            "elapsed_s": progress["elapsed_s"] + (now - self.started),
            "eta_s": (now - session["started"]) / session["steps"] * (self.total_steps - progress["step"]),
            **result["metrics"],
        }

    def train_step(
        self,
        examples: list[RenderedExample] | list[RenderedPair],
        lr: float,
        indices: list[int],
        *,
        counted: bool = True,
    ) -> _StepResult:
        """One optimizer step over examples (this rank's share of the step: those at indices of the training
        set); return the loss and stats of the whole step. counted=False: this rank's examples weigh nothing."""
        self.forward_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.objective == "dpo":
            return self._dpo_step(cast(list[RenderedPair], examples), indices, counted)
        return self._sft_step(cast(list[RenderedExample], examples), counted)

    def _sft_step(self, examples: list[RenderedExample], counted: bool) -> _StepResult:
        """Mean cross-entropy over every trained token of the step (of every rank's share)."""
        micro_batches = list(pack(examples, self.micro_batch_tokens))  # read twice: built once
        loss_tokens = self.team.total(sum(len(batch.targets) for batch in micro_batches) if counted else 0)
        divisor = self.team.gradient_divisor(loss_tokens)
        loss_sum: torch.Tensor | float = 0
        correct: torch.Tensor | int = 0
        tokens = 0
        for batch, real, last in self._rounds(micro_batches, counted):
            batch = batch.to(self.placement.device)
            with self.team.gradient_sync(last):
                with self._autocast():
                    logits = trained_logits(self.forward_model, batch)
                batch_loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
                (batch_loss / divisor if real else batch_loss * 0).backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            if real:
                loss_sum += batch_loss.detach()
                correct += (logits.detach().argmax(-1) == batch.targets).sum()
                tokens += batch.tokens
        loss, right, step_tokens = self.team.sum([float(loss_sum), float(correct), tokens])
        return _StepResult(
            loss=loss / loss_tokens,
            grad_norm=self._optimizer_step(),
            tokens=int(step_tokens),
            metrics={"token_accuracy": right / loss_tokens},
        )

    def _rounds(self, batches: Sequence[Batch], counted: bool) -> Iterator[tuple[Batch, bool, bool]]:
        """(micro-batch, counts?, last?) for as many micro-batches as the rank with the most has.

        Alone, that is each micro-batch once. With several ranks, one that runs out repeats
        its first with no weight, so that every rank joins every collective of the step.
        """
        rounds = self.team.rounds(len(batches))
        for index in range(rounds):
            real = counted and index < len(batches)
            yield batches[index if index < len(batches) else 0], real, index == rounds - 1

    def _dpo_step(self, pairs: list[RenderedPair], indices: list[int], counted: bool) -> _StepResult:
        """Mean DPO loss over the step's pairs (of every rank's share), against the reference computed before training."""
        totals = dpo.PairTotals()
        reference = self.reference["train"][:, indices]
        divisor = self.team.gradient_divisor(self.team.total(len(pairs) if counted else 0))
        packed = pack_pairs(pairs, self.micro_batch_tokens)
        offsets = [group.start for group in packed.groups]
        tokens = 0
        for index, (batch, real, last) in enumerate(self._rounds(packed, counted)):
            offset = offsets[index if index < len(offsets) else 0]
            batch = batch.to(self.placement.device)
            with self.team.gradient_sync(last):
                with self._autocast():
                    chosen, rejected = dpo.answer_logps(self.forward_model, batch)
                ref = reference[:, offset : offset + batch.pairs].to(chosen.device)
                terms = dpo.dpo_terms(chosen, rejected, ref[0], ref[1], self.config.dpo_beta)
                (terms[0].sum() / divisor if real else terms[0].sum() * 0).backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            if real:
                totals.add(*terms, chosen, rejected)
                tokens += batch.tokens
        means = self._summed(totals).means()
        tokens = int(self.team.sum([tokens])[0])
        return _StepResult(loss=means.pop("loss"), grad_norm=self._optimizer_step(), tokens=tokens, metrics=means)

    def _summed(self, totals: dpo.PairTotals) -> dpo.PairTotals:
        """The pair sums of every rank (alone: totals as they are)."""
        if self.team.world_size == 1:
            return totals
        *sums, pairs = self.team.sum([*totals.sums.values(), totals.pairs])
        totals.sums = dict(zip(totals.sums, sums, strict=True))
        totals.pairs = int(pairs)
        return totals

    def _optimizer_step(self) -> float:
        """Clip, step and clear the gradients; return the norm before clipping."""
        max_norm = self.config.grad_clip or math.inf
        grad_norm = self.team.clip(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The objective's loss and metrics over the whole validation file."""
        assert self.val_set is not None  # called only when there is a validation file
        self.model.eval()
        if self.config.objective == "dpo":
            result = self._validate_pairs(cast(list[RenderedPair], self.val_set.examples))
        else:
            result = self._validate_examples(cast(list[RenderedExample], self.val_set.examples))
        self.latest["eval"] = result
        self._report("eval", result)
        return result

    def _validate_examples(self, examples: list[RenderedExample]) -> dict[str, float]:
        """Loss and next-token accuracy over every trained token (each rank validating its part of the file)."""
        loss_sum: float = 0
        correct: float = 0
        count = 0
        own, _, counted = self._own_part(examples)
        for batch, real, _ in self._rounds(pack(own, self.micro_batch_tokens), counted):
            batch = batch.to(self.placement.device)
            with self._autocast():
                logits = trained_logits(self.model, batch)
            if real:
                loss_sum += F.cross_entropy(logits.float(), batch.targets, reduction="sum").item()
                correct += (logits.argmax(-1) == batch.targets).sum().item()
                count += len(batch.targets)
        loss_total, correct_total, counted_total = self.team.sum([loss_sum, correct, count])
        return {
            "step": self.progress["step"],
            "eval_loss": loss_total / counted_total,
            "eval_token_accuracy": correct_total / counted_total,
        }

    def _validate_pairs(self, pairs: list[RenderedPair]) -> dict[str, float]:
        """DPO loss, rewards and log-probabilities, averaged over every validation pair."""
        totals = dpo.PairTotals()
        own, start, counted = self._own_part(pairs)
        packed = pack_pairs(own, self.micro_batch_tokens)
        offsets = [start + group.start for group in packed.groups]
        for index, (batch, real, _) in enumerate(self._rounds(packed, counted)):
            with self._autocast():
                chosen, rejected = dpo.answer_logps(self.model, batch.to(self.placement.device))
            if real:
                offset = offsets[index]
                ref = self.reference["validation"][:, offset : offset + batch.pairs].to(chosen.device)
                totals.add(*dpo.dpo_terms(chosen, rejected, ref[0], ref[1], self.config.dpo_beta), chosen, rejected)
        return {"step": self.progress["step"], **self._summed(totals).means(prefix="eval_")}

    def _own_part(self, items: Sequence[Item]) -> tuple[Sequence[Item], int, bool]:
        """(this rank's contiguous part of a validation file, where it starts, counts?).

        Alone: the whole file, as it is. A rank whose part is empty (a file shorter than the
        ranks) takes the first item, not counted, to join the others' forward passes.
        """
        span = self.team.span(len(items))
        if len(span) == len(items):
            return items, 0, True
        if not span:
            return items[:1], 0, False
        return items[span.start : span.stop], span.start, True

    # --- output --------------------------------------------------------------

    def _save_every(self) -> int:
        """config.save_every, raised where it would write more than MAX_CHECKPOINTS_PER_RUN checkpoints."""
        asked = self.config.save_every
        floor = math.ceil(self.total_steps / MAX_CHECKPOINTS_PER_RUN)
        if not asked or asked >= floor:
            return asked
        self._event(
            f"save_every={asked} would write {math.ceil(self.total_steps / asked)} checkpoints; "
            f"checkpointing every {floor} steps instead (at most {MAX_CHECKPOINTS_PER_RUN} a run)",
            "warn",
        )
        return floor

    def _expected_checkpoint_bytes(self) -> int:
        """The last checkpoint's size, or before the first: the saved weights plus AdamW's two moments."""
        if self.checkpoint_bytes:
            return self.checkpoint_bytes
        saved = self.params if self.config.uses_adapter else list(self.model.parameters())
        weights = sum(p.numel() * p.element_size() for p in saved)
        return weights + sum(2 * p.numel() * 4 for p in self.params)

    def _save_checkpoint(self) -> Path:
        """Every rank calls it (the state is gathered from all of them); rank 0 writes."""
        evaluation = self.latest["eval"]
        if evaluation is not None:
            self.progress["checkpoint_evals"][self.progress["step"]] = evaluation["eval_loss"]
        rngs = self.team.gather(ckpt.rng_state())
        optimizer = self.team.optimizer_state(self.model, self.optimizer)
        weights = self.team.model_state(self.model)
        if not self.team.is_main:
            return ckpt.checkpoint_dir(self.out, self.progress["step"])
        state = {
            **self.progress,
            "elapsed_s": self.progress["elapsed_s"] + (time.monotonic() - self.started),
            "train_examples": len(self.train_set.examples),
            "optimizer": optimizer,
            "rng": rngs[0],
            "metrics": self.latest,
            "config": asdict(self.config),
            **({"reference_logps": self.reference} if self.config.objective == "dpo" else {}),
            **({"rng_by_rank": rngs, "world_size": len(rngs)} if len(rngs) > 1 else {}),
        }
        path = ckpt.save_checkpoint(
            self.out,
            state,
            self.model,
            self.tokenizer,
            full=not self.config.uses_adapter,
            expected_bytes=self._expected_checkpoint_bytes(),
            weights=weights,
        )
        self.checkpoint_bytes = ckpt.folder_bytes(path)
        self.sink("checkpoint", {"step": state["step"], "path": str(path), "metrics": self._checkpoint_metrics()})
        evals = self.progress["checkpoint_evals"]
        best = {min(evals, key=lambda step: (evals[step], -step))} if evals else set()
        for step in ckpt.prune(self.out, keep_last=self.config.keep_checkpoints, keep=best):
            evals.pop(step, None)
            self.sink("checkpoint_removed", {"step": step, "path": str(ckpt.checkpoint_dir(self.out, step))})
        return path

    def _checkpoint_metrics(self) -> dict[str, float | None]:
        """The metrics of a checkpoint, named as the OpenAI checkpoint object names them."""
        train, evaluation = self.latest["train"] or {}, self.latest["eval"] or {}
        return {
            "step": self.progress["step"],
            "train_loss": train.get("loss"),
            "train_mean_token_accuracy": train.get("token_accuracy"),
            "valid_loss": evaluation.get("eval_loss"),
            "valid_mean_token_accuracy": evaluation.get("eval_token_accuracy"),
            "full_valid_loss": evaluation.get("eval_loss"),
            "full_valid_mean_token_accuracy": evaluation.get("eval_token_accuracy"),
            **(
                {
                    "train_reward_accuracy": train.get("reward_accuracy"),
                    "valid_reward_accuracy": evaluation.get("eval_reward_accuracy"),
                    "train_reward_margin": train.get("reward_margin"),
                    "valid_reward_margin": evaluation.get("eval_reward_margin"),
                }
                if self.config.objective == "dpo"
                else {}
            ),
        }

    def _finish(self, stopped: str | None) -> dict[str, Any]:
        output = None
        if stopped is None:
            if self.val_set and (self.latest["eval"] or {}).get("step") != self.progress["step"]:
                self.validate()
            output = self.out / ("adapter" if self.config.uses_adapter else "model")
            weights = self.team.model_state(self.model)
            if self.team.is_main:
                save_weights(self.model, self.tokenizer, output, full=not self.config.uses_adapter, weights=weights)
            self._event(f"Saved {output}")
        train, evaluation = self.latest["train"] or {}, self.latest["eval"] or {}
        summary = {
            "train_tokens": self.progress["tokens"],
            "train_seconds": self.progress["train_seconds"],
            "tokens_per_second": self.progress["tokens"] / max(self.progress["train_seconds"], 1e-9),
            "final_train_loss": train.get("loss"),
            "final_train_token_accuracy": train.get("token_accuracy"),
            "eval_loss": evaluation.get("eval_loss"),
            "eval_token_accuracy": evaluation.get("eval_token_accuracy"),
            "peak_memory_mb": _peak_memory_mb(self.placement.device),
            "truncated_examples": self.train_set.truncated_examples,
            "skipped_examples": self.train_set.skipped_examples,
            "train_examples": len(self.train_set.examples),
            "validation_examples": len(self.val_set.examples) if self.val_set else 0,
            "steps": self.progress["step"],
            "total_steps": self.total_steps,
            "epochs": self.config.epochs,
            "stopped": stopped,
            "early_stopped": self.early_stopped,
            "method": self.config.method,
            "objective": self.config.objective,
            **(
                {
                    "dpo_beta": self.config.dpo_beta,
                    "final_reward_accuracy": train.get("reward_accuracy"),
                    "final_reward_margin": train.get("reward_margin"),
                    "eval_reward_accuracy": evaluation.get("eval_reward_accuracy"),
                    "eval_reward_margin": evaluation.get("eval_reward_margin"),
                }
                if self.config.objective == "dpo"
                else {}
            ),
            "device": self.placement.device.type,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "output_dir": str(output) if output else None,
            "elapsed_s": self.progress["elapsed_s"] + (time.monotonic() - self.started),
        }
        if self.team.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.sink("summary", summary)
        return summary

    def _report(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.team.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps({"kind": kind, **payload}) + "\n")
        self.sink(kind, payload)

    def _trim_metrics_file(self, step: int) -> None:
        """Drop lines written after the checkpoint we resume from: those steps are trained again."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _write_config(self, threads: int, checkpointing: bool) -> None:
        if not self.team.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.config.resume_from:
            (self.out / "metrics.jsonl").write_text("")
        resolved = {
            **asdict(self.config),
            "device": self.placement.device.type,
            "weights_dtype": str(self.placement.weights_dtype).removeprefix("torch."),
            "autocast_dtype": str(self.placement.autocast_dtype).removeprefix("torch.")
            if self.placement.autocast_dtype
            else None,
            "gradient_checkpointing": "on" if checkpointing else "off",
            "micro_batch_tokens": self.micro_batch_tokens,
            "cpu_threads": threads,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "train_examples": len(self.train_set.examples),
            "validation_examples": len(self.val_set.examples) if self.val_set else 0,
            "trainable_params": self.trainable_params,
            **(
                {"world_size": self.team.world_size, "distributed_strategy": self.team.strategy}
                if self.team.world_size > 1
                else {}
            ),
        }
        (self.out / "config.json").write_text(json.dumps(resolved, indent=2))

    def _event(self, message: str, level: str = "info") -> None:
        self.sink("event", {"level": level, "message": message})

    def _interrupt(self) -> None:
        """Stop setup (reading data, the DPO reference) when should_stop asks to."""
        request = self._stop_request()
        if request:
            raise _Interrupted(request)

    def stopped_before_training(self, request: str) -> dict[str, Any]:
        """The summary of a run cancelled or paused before its first step: nothing trained, nothing saved."""
        self._event(f"{'Paused' if request == 'pause' else 'Cancelled'} before training started")
        summary = {"stopped": request, "steps": 0, "train_tokens": 0, "output_dir": None, "method": self.config.method}
        self.sink("summary", summary)
        return summary

    def _stop_request(self) -> str | None:
        """Rank 0's answer to should_stop, on every rank, so all of them stop at the same step."""
        answer = self.should_stop() if self.team.is_main else None
        request = None if not answer else "pause" if answer == "pause" else "cancel"
        return self.team.decide(request)

    def _autocast(self) -> torch.autocast:
        dtype = self.placement.autocast_dtype
        return torch.autocast(self.placement.device.type, dtype=dtype, enabled=dtype is not None)

    def release(self) -> None:
        """Free the model and optimizer memory before returning to a long-lived worker."""
        for name in ("model", "forward_model", "optimizer", "params"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Norms and biases (1-D) are not decayed.
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports the peak resident set of the whole process in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_of(line: str) -> float:
    """The step a metrics line records; a line cut short (a full disk, a killed process) counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
