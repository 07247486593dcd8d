"""The one training loop, shared by pretraining and fine-tuning.

`fit` sets up (the `Checkpointer` chooses and restores, bertforge.train.checkpoint), then
sends prefetched batches through `train_step` (bertforge.train.step); `_Loop` decides when
to log, evaluate, checkpoint and stop, and saves a checkpoint on SIGTERM/SIGINT: after the
step it came in, or, during an evaluation (which changes no weight), at once. On a GPU the
steps run ahead without a host read, and the loop reads the queued steps' figures only
where it needs them, applying the NaN policy there
(docs/architecture.md#train_step-and-its-one-host-read). Evaluation and checkpoints are
off the training clock, which is what time budgets and tokens/s count.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from bertforge.config import TrainConfig
from bertforge.errors import BertforgeError, Interrupted, NonFiniteStep, Terminated
from bertforge.fileio import make_dir
from bertforge.train.checkpoint import Checkpointer, TrainState
from bertforge.train.compiling import compile_loss, ordered_scatter, should_compile
from bertforge.train.distributed import Distributed
from bertforge.train.optim import build_optimizer, lr_at
from bertforge.train.runlog import RunLog
from bertforge.train.runtime import autocast, defer_host_reads
from bertforge.train.step import (
    LossFn,
    PendingStep,
    StepResult,
    Task,
    prefetch,
    read_steps,
    skips_on_device,
    train_step,
)


class Clock:
    """Training time: what elapsed before a resume, plus wall time since, minus the time
    spent off the clock (evaluating, checkpointing)."""

    def __init__(self, before: float):
        self.before, self.start, self.paused = before, time.monotonic(), 0.0

    def __call__(self) -> float:
        return self.before + time.monotonic() - self.start - self.paused

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.paused += time.monotonic() - t0


class _Stop(BaseException):
    """A signal during an evaluation: raised at once (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (never mid-update); within
    `interrupting()` a signal raises _Stop instead, wherever the code is."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._raise = False

    def __enter__(self) -> _SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def is_set(self) -> bool:
        """Whether a signal came."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now, exit 128 + its number
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        self.signum = signum
        if self._raise:
            raise _Stop

    @contextlib.contextmanager
    def interrupting(self, enabled: bool = True) -> Iterator[None]:
        """A signal within the block (or one already flagged) raises _Stop at once, when
        `enabled`: for work that changes no weight and may take long (evaluation)."""
        if enabled and self.signum is not None:
            raise _Stop
        self._raise = enabled
        try:
            yield
        finally:
            self._raise = False

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def fit(
    model: torch.nn.Module,
    task: Task,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    resume: bool = False,
    show_progress: bool = True,
    name: str = "train",
    dist: Distributed | None = None,
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` on `task` until max_steps or the time budget; returns the final metrics.

    `name` labels the progress output ("pretrain", "finetune sst2", ...). Under torchrun,
    `dist` wraps the model (DDP or FSDP) and every rank calls `fit`; only rank 0 writes
    metrics, progress and checkpoints. `run_config`, the run's whole config as a mapping,
    goes to the experiment trackers (W&B) when cfg asks for them.
    """
    if not cfg.max_steps and not cfg.time_budget:
        raise BertforgeError("give --max-steps or --time-budget (how long to train)")
    dist = dist if dist is not None else Distributed()
    run_dir = Path(run_dir)
    if dist.is_main:
        make_dir(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", dist, device, cfg.keep_last)
    checkpointer.choose(resume)
    checkpointer.load_weights(model)  # before sharding: every rank reads the full file
    announce = name if dist.is_main and show_progress else ""
    wrapped, loss_fn, compiled = _compile(
        dist.wrap(model, device, dtype), task, cfg, device, dist, announce
    )
    optimizer = build_optimizer(model, cfg)
    state = TrainState()
    checkpointer.restore(model, optimizer, state, cfg.seed, cfg.max_steps)
    log = _open_log(run_dir, cfg, state, checkpointer, dist, show_progress, name, run_config)
    model.train()
    try:  # the log (and its trackers) closes whatever happens, marked failed on an error
        with (
            _SignalFlag() as signals,
            prefetch(task, state.step, cfg, device) as batches,
            ordered_scatter(device) if compiled else contextlib.nullcontext(),
        ):
            loop = _Loop(
                model, optimizer, task, cfg, device, dtype, dist, state, log, checkpointer, signals
            )
            loop.run(batches, wrapped, loss_fn)
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return loop.result()


def _open_log(
    run_dir: Path,
    cfg: TrainConfig,
    state: TrainState,
    checkpointer: Checkpointer,
    dist: Distributed,
    show_progress: bool,
    name: str,
    run_config: dict[str, Any] | None,
) -> RunLog:
    """The run's log (metrics.jsonl, progress, trackers), written by rank 0 alone."""
    return RunLog(
        run_dir,
        cfg,
        state.step,
        resumed=checkpointer.found is not None,
        enabled=dist.is_main,
        show_progress=show_progress,
        name=name,
        elapsed=state.elapsed_s,
        run_config=run_config,
    )


def _compile(
    wrapped: torch.nn.Module,
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    dist: Distributed,
    name: str,
) -> tuple[torch.nn.Module, LossFn, bool]:
    """(the module to run, the loss function, whether they are compiled), announced under
    `name` unless it is empty. Only `wrapped` is compiled: the plain model's state_dict
    keys carry no _orig_mod."""
    if not should_compile(cfg, device):
        return wrapped, task.loss_sum, False
    if name:
        print(
            f"{name}: compiling the training step (torch.compile; the first step takes "
            f"a minute or more)",
            file=sys.stderr,
        )
    if dist.enabled:  # DDP and FSDP are compiled as modules, their hooks around them
        return cast(torch.nn.Module, torch.compile(wrapped)), task.loss_sum, True
    return wrapped, compile_loss(task.loss_sum), True  # the forward pass and the loss as one graph


class _Loop:
    """What `fit` does between steps: record their figures (reading the steps the GPU ran
    ahead when the host needs them), and log, evaluate, checkpoint and stop when due."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        task: Task,
        cfg: TrainConfig,
        device: torch.device,
        dtype: torch.dtype | None,
        dist: Distributed,
        state: TrainState,
        log: RunLog,
        checkpointer: Checkpointer,
        signals: _SignalFlag,
    ):
        self.model, self.optimizer, self.task, self.cfg = model, optimizer, task, cfg
        self.device, self.dtype, self.dist, self.state = device, dtype, dist, state
        self.log, self.checkpointer, self.signals = log, checkpointer, signals
        self.clock = Clock(state.elapsed_s)
        self.pending: list[PendingStep] = []  # steps run but not read yet
        self.evaluation: dict[str, Any] = {}
        self.evaluated_at: int | None = None

    def run(self, batches: Iterator[Any], wrapped: torch.nn.Module, loss_fn: LossFn) -> None:
        """Train step after step until the run is finished, then end it (`finish`)."""
        cfg, device, dist = self.cfg, self.device, self.dist
        # On a GPU the figures of a step are read only when the host needs them (`take`).
        # Under torchrun with a time budget every step reads rank 0's clock, which sets
        # every rank's learning rate.
        defer = bool(
            defer_host_reads(device)
            and skips_on_device(self.optimizer)
            and not (dist.enabled and cfg.time_budget)
        )
        while not self.finished():
            at, elapsed = self.position()
            try:
                out = train_step(
                    wrapped,
                    self.optimizer,
                    loss_fn,
                    next(batches),
                    lr=lr_at(cfg, at, elapsed),
                    cfg=cfg,
                    device=device,
                    dtype=self.dtype,
                    dist=dist,
                    step=at,
                    clock=self.clock,
                    defer=defer,
                    stop_requested=self.signals.is_set,
                )
            except NonFiniteStep as e:
                raise _nan_error(e, self.checkpointer.saved_at) from None
            self.take(out)
        self.finish()

    def result(self) -> dict[str, Any]:
        """The run's final figures: its step, tokens, training time and last evaluation."""
        state = self.state
        elapsed = round(state.elapsed_s, 3)
        return {"step": state.step, "tokens": state.tokens, "elapsed_s": elapsed, **self.evaluation}

    def position(self) -> tuple[int, float]:
        """The steps run and the training time, counting the steps not read yet."""
        if self.pending:
            return self.pending[-1].step, self.pending[-1].elapsed_s or 0.0
        return self.state.step, self.state.elapsed_s

    def finished(self) -> bool:
        return _finished(self.cfg, *self.position())

    def take(self, out: StepResult | PendingStep) -> None:
        """A step's outcome: recorded now, or, for a pending step, when the host needs its
        figures (`_needs_read`); then what is due after the steps recorded."""
        if isinstance(out, StepResult):
            self.record(out)
            stop = out.stop
        else:
            self.pending.append(out)
            if not self._needs_read(out):
                return
            stop = self.settle()
        step = self.state.step
        if _due(self.cfg.eval_every, step):
            self.evaluate()
        if _due(self.cfg.checkpoint_every, step) or stop:
            self.save()
        if stop:
            raise Interrupted(self.signals.signum or signal.SIGTERM, step)

    def _needs_read(self, p: PendingStep) -> bool:
        cfg = self.cfg
        return bool(
            p.step == 1
            or _due(cfg.log_every, p.step)
            or _due(cfg.eval_every, p.step)
            or _due(cfg.checkpoint_every, p.step)
            or _finished(cfg, p.step, p.elapsed_s or 0.0)
            or (p.signalled and not self.dist.enabled)
        )

    def record(self, result: StepResult) -> None:
        """Apply the NaN policy to a step read, count it and log it."""
        if not result.applied and self.cfg.on_nan == "stop":
            raise _nan_error(
                NonFiniteStep(self.state.step + 1, result.problem), self.checkpointer.saved_at
            )
        state = self.state
        state.advance(result)
        self.log.train(
            state.step,
            state.tokens,
            state.skipped_steps,
            state.elapsed_s,
            self.task.epoch_at(state.step),
            result.lr,
            result,
        )

    def settle(self) -> bool:
        """Read the pending steps in one transfer and record them; whether one asks to
        stop."""
        stop = False
        for result in read_steps(self.pending):
            self.record(result)
            stop = stop or result.stop
        self.pending.clear()
        return stop

    def evaluate(self) -> None:
        """Held-out metrics, logged. A signal stops it at once in one process (it changes
        no weight, so the step it follows is saved); under torchrun it is finished, and the
        next step stops: FSDP's forward is a collective, which ranks must not leave at
        different batches."""
        state = self.state
        try:
            with self.clock.off(), self.signals.interrupting(enabled=not self.dist.enabled):
                self.evaluation = _evaluate(
                    self.model, self.task, state.step, self.device, self.dtype
                )
        except _Stop:
            if self.checkpointer.saved_at != state.step:
                self.save()
            raise Interrupted(self.signals.signum or signal.SIGTERM, state.step) from None
        self.log.eval(state.step, state.tokens, state.elapsed_s, self.evaluation)
        self.evaluated_at = state.step

    def save(self) -> None:
        """A checkpoint of the steps recorded; a collective (every rank calls it)."""
        with self.clock.off():
            self.checkpointer.save(
                self.model, self.optimizer, self.state, self.task.epoch_at(self.state.step)
            )

    def finish(self) -> None:
        """The last steps read, evaluated and saved. Still under the signal handlers: a
        signal here, too, saves the last step."""
        self.settle()
        if self.evaluated_at != self.state.step or not self.evaluation:
            self.evaluate()
        if self.checkpointer.saved_at != self.state.step:
            self.save()


def _nan_error(e: NonFiniteStep, saved_at: int | None) -> BertforgeError:
    kept = f"step {saved_at}" if saved_at else "none"
    return BertforgeError(
        f"{e}; stopped without saving it (last checkpoint: {kept}); lower "
        f"--lr, check the data, or pass --on-nan skip"
    )


def _finished(cfg: TrainConfig, step: int, elapsed: float) -> bool:
    return bool(
        (cfg.max_steps and step >= cfg.max_steps)
        or (cfg.time_budget and elapsed >= cfg.time_budget)
    )


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _evaluate(
    model: torch.nn.Module, task: Task, step: int, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Any]:
    """Held-out metrics in the training precision; every rank calls it (FSDP's forward is
    a collective)."""
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            return task.evaluate(model, step)
    finally:
        model.train()
