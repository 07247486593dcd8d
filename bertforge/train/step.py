"""One optimizer step, and the batches that feed it.

- `StepBatch`: this process's share of one step's global batch, on the host: the
  micro-batches, how many loss terms of each kind they hold, and their real tokens.
  A task builds it from the step alone (`Task.batch(step)`), which is what makes resume
  exact and O(1).
- `prefetch`: the batches of the steps to come, built ahead of time by a
  `torch.utils.data.DataLoader` over step indices: in `num_workers` background
  processes, into pinned memory when the device is a GPU, so that the masking of step
  t + 1 overlaps the compute of step t and the copy to the device does not block.
- `train_step`: forward and backward over the micro-batches, each loss term normalised
  by its count over the whole global batch; gradient clipping; the non-finite guard and
  the `on_nan` policy; the update. It returns a `StepResult`, or with `defer` a
  `PendingStep` whose figures `read_steps` brings over later, with those of other steps.

Host-device synchronisation. Nothing in the micro-batch loop reads a device value: the
counts that normalise the loss come from the host side of the batch, metrics stay
tensors, and the clipping factor is applied on the device. What the host wants of a
step (loss sums, metrics, gradient norm, and under torchrun the global counts, the stop
flag and rank 0's clock) is one device tensor, read in one transfer:

- on a GPU with fused AdamW (`defer=True`), not before `optimizer.step()`: a non-finite
  update is dropped on the device (`found_inf`, as GradScaler does), and the caller
  reads the steps' figures when it needs them (`read_steps`), so the device never
  drains between steps;
- otherwise (the CPU, where a read costs nothing, or an optimizer that cannot skip on
  the device) once per step, before `optimizer.step()`: the host decides whether the
  update may be applied.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from bertforge.config import TrainConfig
from bertforge.train.distributed import Distributed
from bertforge.errors import NonFiniteStep
from bertforge.train.runtime import autocast, autocast_off, default_workers


@dataclass
class StepBatch:
    """This process's share of the global batch of one step, on the host."""

    micro: list[Any]  # micro-batches, each with .to(device) and .pin_memory()
    counts: dict[str, int]  # loss terms of each kind in `micro` (masked tokens, pairs, ...)
    tokens: int  # real input tokens in `micro` (padding excluded)

    def pin_memory(self) -> StepBatch:
        return StepBatch([m.pin_memory() for m in self.micro], self.counts, self.tokens)


LossFn = Callable[[torch.nn.Module, Any], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


class Task(Protocol):
    """What `fit` trains on."""

    def batch(self, step: int) -> StepBatch:
        """This process's share of the global batch at `step`: a pure function of it."""

    def loss_sum(self, model: torch.nn.Module, micro: Any
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The summed (not averaged) loss of each term of a micro-batch on the device,
        keyed like `StepBatch.counts`, and extra summed metrics as device tensors. A
        metric named TERM_... is normalised by TERM's count, any other by the first
        term's."""

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Held-out metrics of the model after `step` steps."""

    def epoch_at(self, step: int) -> float:
        ...


@dataclass
class StepResult:
    """What one `train_step` did, on the host."""

    terms: dict[str, float]  # each loss term over the global batch, normalised by its count
    metrics: dict[str, float]  # the task's extra metrics, normalised likewise
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
               batch: StepBatch, *, lr: float, cfg: TrainConfig, device: torch.device,
               dtype: torch.dtype | None, dist: Distributed | None = None, step: int = 0,
               stop_requested: Callable[[], bool] | None = None,
               clock: Callable[[], float] | None = None, defer: bool = False
               ) -> StepResult | PendingStep:
    """One optimizer step on `batch` at learning rate `lr` (see the module docstring).

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
    for group in optimizer.param_groups:
        group["lr"] = lr
    names = list(batch.counts)
    if dist.enabled:  # the global counts, queued on the device: no host sync
        counts_t = dist.reduce_sum(dist.host_values([*batch.counts.values(), batch.tokens]))
        divisors = dict(zip(names, counts_t[:-1].float().clamp(min=1).to(device).unbind()))
    else:
        divisors = {k: float(max(v, 1)) for k, v in batch.counts.items()}

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
                loss = sum(v / divisors[k] for k, v in losses.items())
                # DDP and FSDP average gradients over ranks; the global batch sums them.
                with autocast_off(device, dtype):
                    (loss * dist.world_size if dist.enabled else loss).backward()
            for bucket, values in ((sums, losses), (extra, more)):
                for k, v in values.items():
                    v = v.detach()
                    bucket[k] = bucket[k] + v if k in bucket else v
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = dist.clip_grad_norm(params, cfg.grad_clip)

    # Everything the host may want of this step, as one device tensor: the loss sums and
    # metrics (summed over ranks under torchrun), then the stop flag and rank 0's clock,
    # the global counts and tokens, and the gradient norm.
    local = torch.stack([v.double() for v in (*sums.values(), *extra.values())])
    signalled = stop_requested is not None and stop_requested()
    if dist.enabled:
        control = dist.host_values([float(signalled),
                                    clock() if (clock is not None and dist.is_main) else 0.0])
        values = torch.cat([dist.reduce_sum(torch.cat([local.to(control.device), control])),
                            counts_t, norm.reshape(1).to(control.device)])
    else:
        values = torch.cat([local, norm.reshape(1).to(local.device)])
    pending = PendingStep(values, list(sums), list(extra), names, step + 1, lr,
                          dict(batch.counts), batch.tokens, signalled,
                          clock() if clock is not None else None, dist.enabled)
    if defer and skips_on_device(optimizer):
        # The update is dropped on the device when the loss or the norm is not finite
        # (the same on every rank: the sums are global), as GradScaler drives fused AdamW.
        found_inf = (~torch.isfinite(values[:len(sums)].sum() + values[-1])).float()
        found_inf = found_inf.to(params[0].device, non_blocking=True)
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
        optimizer, "_step_supports_amp_scaling", False)


@dataclass
class PendingStep:
    """A step whose figures are still on the device: `read_steps` brings them over."""

    values: torch.Tensor  # (terms + metrics [+ 2 control + counts + 1 tokens] + 1 norm,)
    terms: list[str]
    metrics: list[str]
    names: list[str]  # the batch's count names, in order
    step: int  # the step number this is (1-based: steps done after it)
    lr: float
    counts: dict[str, int]  # this process's counts (the global ones when alone)
    tokens: int
    signalled: bool  # this process was asked to stop
    elapsed_s: float | None  # this process's clock at the end of the step
    shared: bool  # values hold the torchrun control values


def read_steps(pending: list[PendingStep]) -> list[StepResult]:
    """The StepResults of `pending` steps, read from the device in one transfer."""
    if not pending:
        return []
    flat = torch.cat([p.values.to(pending[0].values.device) for p in pending]).tolist()
    ends = list(itertools.accumulate(len(p.values) for p in pending))
    return [_result(p, flat[end - len(p.values):end]) for p, end in zip(pending, ends)]


def _result(p: PendingStep, read: list[float]) -> StepResult:
    names = p.names
    if p.shared:
        stop, elapsed = read[-len(names) - 4] > 0, read[-len(names) - 3]
        counts = dict(zip(names, read[-len(names) - 2:-2]))
        tokens = int(read[-2])
    else:
        stop, elapsed = p.signalled, p.elapsed_s
        counts, tokens = {k: float(v) for k, v in p.counts.items()}, p.tokens
    grad_norm = read[-1]
    n = len(p.terms)
    terms = {k: v / max(counts[k], 1.0) for k, v in zip(p.terms, read[:n])}
    metrics = {k: v / max(counts.get(k.split("_")[0], counts[names[0]]), 1.0)
               for k, v in zip(p.metrics, read[n:n + len(p.metrics)])}
    result = StepResult(terms, metrics, grad_norm, applied=False, tokens=tokens, stop=stop,
                        elapsed_s=elapsed, counts=counts, lr=p.lr)
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
def prefetch(task: Task, start: int, cfg: TrainConfig, device: torch.device,
             start_method: str | None = None) -> Iterator[Iterator[StepBatch]]:
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
    loader = DataLoader(_Steps(task), sampler=steps, batch_size=None, collate_fn=_as_is,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None,
                        multiprocessing_context=start_method if workers else None,
                        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # now, not when the iterator is collected
            shutdown()
