"""One optimizer step, and the prefetching of the batches that feed it.

- `train_step`: `accumulate_gradients` (forward and backward over the micro-batches of a
  `StepBatch`, each loss term normalised by its count over the whole global batch), then
  `finish_step` (clipping, the non-finite guard and the `on_nan` policy, the update).
- `prefetch`: the batches of the steps to come, built ahead by a DataLoader over step
  indices in background processes (into pinned memory on a GPU).

Nothing in the micro-batch loop reads a device value. What the host wants of a step is
packed by name into one device tensor (`Packed`) and read in one transfer: on a GPU with
fused AdamW (`defer=True`) not before `optimizer.step()`, a non-finite update being dropped
on the device and the figures read later by `read_steps` (from a `PendingStep`); otherwise
once a step, before `optimizer.step()`, so that the host decides whether the update is
applied. Why: docs/architecture.md#train_step-and-its-one-host-read.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from bertforge.config import TrainConfig
from bertforge.errors import NonFiniteStep
from bertforge.tasks.base import LossFn, StepBatch, Task
from bertforge.train.distributed import Distributed
from bertforge.train.runtime import autocast, autocast_off, default_workers


@dataclass
class StepResult:
    """What one `train_step` did, on the host."""

    terms: dict[str, float]  # each loss term over the global batch, normalised by its count
    metrics: dict[str, float]  # the task's extra metrics, normalised by their counts
    grad_norm: float  # before clipping
    applied: bool  # False: the loss or the gradient norm was not finite; no update
    tokens: int  # real tokens of the global batch
    stop: bool = False  # some rank was signalled: every rank stops after this step
    elapsed_s: float | None = None  # rank 0's training clock at the end of the step
    counts: dict[str, float] = field(default_factory=dict)  # global counts of each term
    lr: float = 0.0  # the learning rate the step ran at

    @property
    def loss(self) -> float:
        return sum(self.terms.values())

    @property
    def problem(self) -> str:
        """What was not finite, e.g. 'loss (nan)' or 'gradient norm (inf)'."""
        if not math.isfinite(self.loss):
            return f"loss ({self.loss})"
        return f"gradient norm ({self.grad_norm})"


@dataclass
class Packed:
    """Named scalars in one float64 tensor, so that the host reads them in one transfer:
    packed by name, unpacked by name."""

    names: list[str]
    values: torch.Tensor  # (len(names),) float64

    @staticmethod
    def of(scalars: dict[str, torch.Tensor]) -> Packed:
        return Packed(
            list(scalars), torch.stack([v.double().reshape(()) for v in scalars.values()])
        )

    def __add__(self, other: Packed) -> Packed:
        """Both, on this one's device."""
        return Packed(
            self.names + other.names, torch.cat([self.values, other.values.to(self.values.device)])
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self.names.index(name)]

    def unpack(self, read: list[float]) -> dict[str, float]:
        """`read`, this one's values as the host read them, by name."""
        return dict(zip(self.names, read, strict=True))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: StepBatch,
    *,
    lr: float,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    dist: Distributed | None = None,
    step: int = 0,
    stop_requested: Callable[[], bool] | None = None,
    clock: Callable[[], float] | None = None,
    defer: bool = False,
) -> StepResult | PendingStep:
    """One optimizer step on `batch` at learning rate `lr` (see the module docstring):
    `accumulate_gradients` over the micro-batches, then `finish_step`.

    `model` is what runs forward and backward (possibly DDP-wrapped or compiled); the
    gradients clipped and applied are those of the optimizer's parameters. `step` is the
    number of steps done before this one. `stop_requested` and `clock` tell whether this
    process was asked to stop and its training time, read at the end of the step; under
    torchrun they are shared in the step's one sync, so every rank stops after the same
    step and sees rank 0's time. A non-finite loss or
    gradient norm never reaches the weights: with on_nan 'stop' NonFiniteStep is raised,
    with 'skip' the result says `applied=False`.

    With `defer` and a fused optimizer nothing is read: the update is skipped on the
    device when not finite, and a `PendingStep` is returned for `read_steps` to read when
    the host needs the figures (the caller then applies the NaN policy).
    """
    dist = dist if dist is not None else Distributed()
    counts = None
    divisors: dict[str, float | torch.Tensor]
    if dist.enabled:  # the global counts, queued on the device: no host sync
        counts = Packed(
            [*(f"count/{k}" for k in batch.counts), "tokens"],
            dist.reduce_sum(dist.host_values([*batch.counts.values(), batch.tokens])),
        )
        divisors = {k: counts[f"count/{k}"].float().clamp(min=1).to(device) for k in batch.counts}
    else:
        divisors = {k: float(max(v, 1)) for k, v in batch.counts.items()}
    losses, metrics = accumulate_gradients(
        model, loss_fn, batch, divisors, device=device, dtype=dtype, dist=dist
    )
    return finish_step(
        optimizer,
        losses,
        metrics,
        batch,
        counts,
        lr=lr,
        cfg=cfg,
        dist=dist,
        step=step,
        signalled=stop_requested is not None and stop_requested(),
        elapsed=clock() if clock is not None else None,
        defer=defer,
    )


def accumulate_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: StepBatch,
    divisors: Mapping[str, float | torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    dist: Distributed,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward over the micro-batches of `batch`, each loss term divided by
    its global count (`divisors`), so that the gradients add up to those of the global
    batch; under torchrun they are reduced over ranks with the last micro-batch. Returns
    the loss terms' and the metrics' sums over the micro-batches, on the device."""
    sums: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    last = len(batch.micro) - 1
    # One autocast region for the whole step: its cache keeps each weight's bf16 copy from
    # the first micro-batch to the last (one cast a step, not one a micro-batch). The
    # backward passes run with autocast off inside it, as autocast asks.
    with autocast(device, dtype):
        for i, micro in enumerate(batch.micro):
            micro = micro.to(device)
            with dist.sync_gradients(i == last):
                losses, more = loss_fn(model, micro)
                # A task has at least one loss term: the sum is a tensor.
                loss = cast(torch.Tensor, sum(v / divisors[k] for k, v in losses.items()))
                # DDP and FSDP average gradients over ranks; the global batch sums them.
                with autocast_off(device, dtype):
                    (loss * dist.world_size if dist.enabled else loss).backward()
            for bucket, values in ((sums, losses), (extra, more)):
                for k, v in values.items():
                    v = v.detach()
                    bucket[k] = bucket[k] + v if k in bucket else v
    return sums, extra


def finish_step(
    optimizer: torch.optim.Optimizer,
    losses: dict[str, torch.Tensor],
    metrics: dict[str, torch.Tensor],
    batch: StepBatch,
    counts: Packed | None,
    *,
    lr: float,
    cfg: TrainConfig,
    dist: Distributed,
    step: int,
    signalled: bool,
    elapsed: float | None,
    defer: bool,
) -> StepResult | PendingStep:
    """Clip the accumulated gradients, pack the step's figures (`losses` and `metrics`
    summed over the step, the gradient norm; under torchrun the global `counts` and the
    stop flag and clock of `signalled` and `elapsed`, shared) into one device tensor, and
    update at learning rate `lr`: decided on the device with `defer` (a `PendingStep`
    returned), else on the host after reading the figures (a `StepResult`)."""
    undeclared = [k for k in metrics if batch.metric_counts.get(k) not in batch.counts]
    if undeclared:
        raise ValueError(
            f"metric {undeclared[0]!r}: StepBatch.metric_counts names none of "
            f"the batch's counts {list(batch.counts)} for it"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = dist.clip_grad_norm(params, cfg.grad_clip)
    figures = Packed.of(
        {
            **{f"loss/{k}": v for k, v in losses.items()},
            **{f"metric/{k}": v for k, v in metrics.items()},
        }
    )
    # What this process knows without a read; under torchrun the shared figures replace it.
    host = {
        **{f"count/{k}": float(v) for k, v in batch.counts.items()},
        "tokens": batch.tokens,
        "stop": float(signalled),
        "clock": elapsed,
    }
    if dist.enabled and counts is not None:  # the sums and the stop flag over ranks
        control = Packed(
            ["stop", "clock"],
            dist.host_values(
                [float(signalled), elapsed if (elapsed is not None and dist.is_main) else 0.0]
            ),
        )
        summed = control + figures
        figures = Packed(summed.names, dist.reduce_sum(summed.values)) + counts
    figures = figures + Packed.of({"grad_norm": norm})
    pending = PendingStep(
        figures,
        host,
        list(losses),
        list(batch.counts),
        {k: batch.metric_counts[k] for k in metrics},
        step + 1,
        lr,
        signalled,
        elapsed,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    if defer and skips_on_device(optimizer):
        # The update is dropped on the device when the loss or the norm is not finite
        # (the same on every rank: the sums are global), as GradScaler drives fused AdamW.
        total = sum(figures[f"loss/{k}"] for k in losses) + figures["grad_norm"]
        found_inf = (~torch.isfinite(total)).float().to(params[0].device, non_blocking=True)
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        optimizer.zero_grad(set_to_none=True)
        return pending
    result = read_steps([pending])[0]  # the host decides before the update
    if result.applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not result.applied and cfg.on_nan == "stop":
        raise NonFiniteStep(step + 1, result.problem)
    return result


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` can drop a non-finite update on the device (fused Adam/AdamW
    read GradScaler's `found_inf`); others need the host to decide."""
    return bool(optimizer.defaults.get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )


@dataclass
class PendingStep:
    """A step whose figures are still on the device: `read_steps` brings them over."""

    figures: Packed  # loss/TERM, metric/NAME, grad_norm [, count/TERM, tokens, stop, clock]
    host: dict[str, Any]  # count/TERM, tokens, stop and clock as this process knows them
    terms: list[str]  # the loss terms
    counts: list[str]  # the batch's count names
    metric_counts: dict[str, str]  # each metric: the count it is normalised by
    step: int  # the step number this is (1-based: steps done after it)
    lr: float
    signalled: bool  # this process was asked to stop
    elapsed_s: float | None  # this process's clock at the end of the step


def read_steps(pending: list[PendingStep]) -> list[StepResult]:
    """The StepResults of `pending` steps, read from the device in one transfer."""
    if not pending:
        return []
    device = pending[0].figures.values.device
    flat = torch.cat([p.figures.values.to(device) for p in pending]).tolist()
    ends = list(itertools.accumulate(len(p.figures.names) for p in pending))
    return [
        _result(p, p.figures.unpack(flat[end - len(p.figures.names) : end]))
        for p, end in zip(pending, ends, strict=True)
    ]


def _result(p: PendingStep, read: dict[str, float]) -> StepResult:
    got = {**p.host, **read}  # under torchrun, the shared figures replace this process's
    counts = {k: float(got[f"count/{k}"]) for k in p.counts}
    terms = {k: got[f"loss/{k}"] / max(counts[k], 1.0) for k in p.terms}
    metrics = {k: got[f"metric/{k}"] / max(counts[c], 1.0) for k, c in p.metric_counts.items()}
    grad_norm = got["grad_norm"]
    result = StepResult(
        terms,
        metrics,
        grad_norm,
        applied=False,
        tokens=int(got["tokens"]),
        stop=got["stop"] > 0,
        elapsed_s=got["clock"],
        counts=counts,
        lr=p.lr,
    )
    result.applied = math.isfinite(result.loss) and math.isfinite(grad_norm)
    return result


# --------------------------------------------------------------------------- prefetching


class _Steps(Dataset):
    """A task seen by a DataLoader: item `step` is that step's StepBatch."""

    def __init__(self, task: Task):
        self.task = task

    def __getitem__(self, step: int) -> StepBatch:
        return self.task.batch(step)


def _as_is(batch: StepBatch) -> StepBatch:  # collate: a StepBatch is a batch already
    return batch


@contextlib.contextmanager
def prefetch(
    task: Task, start: int, cfg: TrainConfig, device: torch.device, start_method: str | None = None
) -> Iterator[Iterator[StepBatch]]:
    """The StepBatches of steps start, start + 1, ... (up to max_steps when set), built
    ahead by cfg.num_workers background processes (default: `default_workers(device)`)
    and pinned when `device` is a GPU. Batches depend on the step alone, so the workers
    change no result; with 0 workers each batch is built when it is asked for.

    The workers start by the platform's default method (`start_method`: "fork",
    "forkserver" or "spawn" to choose); the task is pickled into them under the last
    two, which the memmapped shards allow (they reopen on unpickling)."""
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    steps = range(start, cfg.max_steps) if cfg.max_steps else itertools.count(start)
    # A generator of its own: the loader draws its workers' base seed from it, which must
    # not consume the global RNG that dropout (and so exact resume) depends on.
    loader = DataLoader(
        _Steps(task),
        sampler=steps,
        batch_size=None,
        # torch's stub wants a list: with batch_size=None it gets one item
        collate_fn=_as_is,  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        multiprocessing_context=start_method if workers else None,
        generator=torch.Generator().manual_seed(0),
    )
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # now, not when the iterator is collected
            shutdown()
