"""The one training loop, shared by pretraining and fine-tuning.

- `TrainState`: what a checkpoint restores besides the weights and the optimizer: step,
  tokens, training time, skipped steps and the RNG. The data position is the step itself,
  because batches are a pure function of the step.
- `fit`: prefetched batches go through `train_step` (bertforge.train.step: accumulation,
  normalisation, clipping, the NaN policy, the update); the loop around it decides when
  to log, evaluate, checkpoint and stop, and saves a checkpoint on SIGTERM/SIGINT: after
  the step it came in, or, during an evaluation (which changes no weight), at once.

Host syncs: on the CPU once a step, inside `train_step` before the update. On a GPU the
steps run ahead without one (a non-finite update is dropped on the device, bertforge.train.step)
and the loop reads the queued steps' figures in one transfer only where the host needs
them: a logging, evaluation or checkpoint step, the last step, a stop signal (under
torchrun, checked at those reads), and every step under torchrun with a time budget,
whose learning rate follows rank 0's clock. The NaN policy is applied at the read: with
on_nan 'stop' the run stops naming the first non-finite step, before any checkpoint after
it. Evaluation and checkpoints are off the training
clock, which is what time budgets and tokens/s count.
"""

from __future__ import annotations

import base64
import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertforge.train import checkpoint as ckpt
from bertforge.train.compiling import compile_loss, ordered_scatter, should_compile
from bertforge.config import TrainConfig
from bertforge.train.consistency import check_optimizer_state
from bertforge.train.distributed import Distributed
from bertforge.errors import BertforgeError, Interrupted, NonFiniteStep, Terminated
from bertforge.fileio import make_dir
from bertforge.train.optim import build_optimizer, lr_at
from bertforge.train.runlog import RunLog
from bertforge.train.runtime import autocast, defer_host_reads
from bertforge.train.step import (
    PendingStep,
    StepResult,
    Task,
    prefetch,
    read_steps,
    skips_on_device,
    train_step,
)


@dataclass
class TrainState:
    """The loop's own state: all a checkpoint needs besides weights and optimizer."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # real input tokens trained on, all processes together
    elapsed_s: float = 0.0  # training time (evaluation and checkpoints excluded)
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient

    def advance(self, result: StepResult, elapsed_s: float) -> None:
        self.step += 1
        self.tokens += result.tokens
        self.skipped_steps += not result.applied
        self.elapsed_s = elapsed_s

    def state_dict(self, device: torch.device) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s,
                "skipped_steps": self.skipped_steps, "rng": rng_state(device)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device,
                        where: str = "state", max_steps: int | None = None) -> None:
        """Restore from `state_dict()`'s output; a None or absent "rng" leaves the RNG.

        A value that cannot be restored is refused (BertforgeError naming `where` and the
        field): a state.json's checksums only say that it is what was sealed. So is a
        step past the run's `max_steps`: no run of this config wrote it.
        """
        self.step, self.tokens = _count(state, "step", where), _count(state, "tokens", where)
        if max_steps and self.step > max_steps:
            raise BertforgeError(f"{where}: step {self.step} is past the run's max_steps "
                                 f"{max_steps} (a state from another run, or --max-steps "
                                 f"lowered below it)")
        elapsed = state.get("elapsed_s")
        if (isinstance(elapsed, bool) or not isinstance(elapsed, (int, float))
                or not math.isfinite(elapsed) or elapsed < 0):
            raise BertforgeError(f"{where}: elapsed_s {elapsed!r:.40} is not a time in seconds")
        self.elapsed_s = float(elapsed)
        self.skipped_steps = _count({"skipped_steps": 0, **state}, "skipped_steps", where)
        if state.get("rng") is not None:
            set_rng_state(state["rng"], device, where)


def _count(state: dict[str, Any], name: str, where: str) -> int:
    """state[name], which must be an integer that int64 holds, >= 0."""
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise BertforgeError(f"{where}: {name} {value!r:.40} is not a count (an integer >= 0)")
    return value


def rng_state(device: torch.device) -> dict[str, str]:
    """torch's CPU generator, and the device's when it is a GPU (a CPU run never touches
    CUDA), as base64 text for state.json."""
    def enc(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()
    state = {"torch": enc(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = enc(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict[str, str], device: torch.device, where: str = "state") -> None:
    """Restore `rng_state`'s output; BertforgeError naming `where` if torch refuses it."""
    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    try:
        torch.set_rng_state(dec(state["torch"]))
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(dec(state["cuda"]), device)
    except (KeyError, TypeError, ValueError, RuntimeError):  # base64's errors are ValueErrors
        raise BertforgeError(f"{where}: rng is not a random generator state torch can "
                             f"restore") from None


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
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

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


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: Path,
        device: torch.device, dtype: torch.dtype | None, *, resume: bool = False,
        show_progress: bool = True, name: str = "train",
        dist: Distributed | None = None,
        run_config: dict[str, Any] | None = None) -> dict[str, Any]:
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
    ckpt_dir = run_dir / "checkpoints"
    found = _find_checkpoint(ckpt_dir, resume, dist)
    if found is not None:  # weights go in before sharding: every rank reads the full file
        ckpt.load_model_weights(model, ckpt.load_weights(found[0]))
    wrapped = dist.wrap(model, device, dtype)
    loss_fn = task.loss_sum
    compiled = should_compile(cfg, device)
    if compiled:  # `model` stays the plain module: its state_dict keys carry no _orig_mod.
        if dist.is_main and show_progress:
            print(f"{name}: compiling the training step (torch.compile; the first step takes "
                  f"a minute or more)", file=sys.stderr)
        if dist.enabled:  # DDP and FSDP are compiled as modules, their hooks around them
            wrapped = torch.compile(wrapped)
        else:  # the forward pass and the loss as one graph
            loss_fn = compile_loss(task.loss_sum)
    optimizer = build_optimizer(model, cfg)
    state = TrainState()
    if found is not None:
        path, saved = found
        optimizer_state = ckpt.load_optimizer_state(path)
        check_optimizer_state(optimizer_state, optimizer, str(path / ckpt.OPTIMIZER_FILE))
        dist.load_optimizer_state(model, optimizer, optimizer_state)
        where = str(path / ckpt.STATE_FILE)
        state.load_state_dict({**saved, "rng": _rank_rng(saved, dist, cfg.seed, where)},
                              device, where, max_steps=cfg.max_steps)
        if dist.is_main:
            print(f"resuming from {path.name} (step {state.step}, {state.tokens:,} tokens)",
                  file=sys.stderr)
    elif dist.rank > 0:  # same initial weights everywhere, but each rank its own dropout
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    log = RunLog(run_dir, cfg, state.step, resumed=found is not None, enabled=dist.is_main,
                 show_progress=show_progress, name=name, elapsed=state.elapsed_s,
                 run_config=run_config)
    clock = Clock(state.elapsed_s)
    saved_at = state.step if found is not None else None
    evaluation, evaluated_at = {}, None

    def save() -> None:  # a collective: every rank calls it, rank 0 writes
        nonlocal saved_at
        with clock.off():
            _save(ckpt_dir, model, optimizer, state, task, cfg, dist, device)
        saved_at = state.step

    def evaluate() -> None:
        """Held-out metrics, logged. A signal stops it at once in one process (it changes
        no weight, so the step it follows is saved); under torchrun it is finished, and the
        next step stops: FSDP's forward is a collective, which ranks must not leave at
        different batches."""
        nonlocal evaluation, evaluated_at
        try:
            with clock.off(), signals.interrupting(enabled=not dist.enabled):
                evaluation = _evaluate(model, task, state.step, device, dtype)
        except _Stop:
            if saved_at != state.step:
                save()
            raise Interrupted(signals.signum or signal.SIGTERM, state.step) from None
        log.eval(state.step, state.tokens, state.elapsed_s, evaluation)
        evaluated_at = state.step

    # On a GPU the figures of a step are read only when the host needs them: to log, to
    # evaluate or checkpoint, at the end, on a stop. Under torchrun with a time budget
    # every step reads rank 0's clock, which sets every rank's learning rate.
    defer = (defer_host_reads(device) and skips_on_device(optimizer)
             and not (dist.enabled and cfg.time_budget))
    pending: list[PendingStep] = []

    def record(result: StepResult) -> None:
        if not result.applied and cfg.on_nan == "stop":
            raise _nan_error(NonFiniteStep(state.step + 1, result.problem), saved_at)
        state.advance(result, result.elapsed_s)
        log.train(state.step, state.tokens, state.skipped_steps, state.elapsed_s,
                  task.epoch_at(state.step), result.lr, result)

    def settle() -> bool:
        """Read the pending steps in one transfer and record them; whether one asks to
        stop."""
        stop = False
        for result in read_steps(pending):
            record(result)
            stop = stop or result.stop
        pending.clear()
        return stop

    def needs_read(p: PendingStep) -> bool:
        return bool(p.step == 1 or _due(cfg.log_every, p.step) or _due(cfg.eval_every, p.step)
                    or _due(cfg.checkpoint_every, p.step)
                    or _finished(cfg, p.step, p.elapsed_s or 0.0)
                    or (p.signalled and not dist.enabled))

    model.train()
    try:  # the log (and its trackers) closes whatever happens, marked failed on an error
        with (_SignalFlag() as signals, prefetch(task, state.step, cfg, device) as batches,
              ordered_scatter(device) if compiled else contextlib.nullcontext()):
            at, elapsed = state.step, state.elapsed_s  # past the pending steps too
            while not _finished(cfg, at, elapsed):
                lr = lr_at(cfg, at, elapsed)
                try:
                    out = train_step(wrapped, optimizer, loss_fn, next(batches),
                                     lr=lr, cfg=cfg, device=device, dtype=dtype, dist=dist,
                                     step=at, clock=clock, defer=defer,
                                     stop_requested=lambda: signals.signum is not None)
                except NonFiniteStep as e:
                    raise _nan_error(e, saved_at) from None
                if isinstance(out, PendingStep):
                    pending.append(out)
                    at, elapsed = out.step, out.elapsed_s or 0.0
                    if not needs_read(out):
                        continue
                    stop = settle()
                else:
                    record(out)
                    stop = out.stop
                at, elapsed = state.step, state.elapsed_s
                if _due(cfg.eval_every, state.step):
                    evaluate()
                if _due(cfg.checkpoint_every, state.step) or stop:
                    save()
                if stop:
                    raise Interrupted(signals.signum or signal.SIGTERM, state.step)
            settle()
            # still under the signal handlers: a signal here, too, saves the last step
            if evaluated_at != state.step or not evaluation:
                evaluate()
            if saved_at != state.step:
                save()
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return {"step": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 3),
            **evaluation}


def _nan_error(e: NonFiniteStep, saved_at: int | None) -> BertforgeError:
    kept = f"step {saved_at}" if saved_at else "none"
    return BertforgeError(f"{e}; stopped without saving it (last checkpoint: {kept}); lower "
                          f"--lr, check the data, or pass --on-nan skip")


def _finished(cfg: TrainConfig, step: int, elapsed: float) -> bool:
    return bool((cfg.max_steps and step >= cfg.max_steps)
                or (cfg.time_budget and elapsed >= cfg.time_budget))


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _evaluate(model: torch.nn.Module, task: Task, step: int, device: torch.device,
              dtype: torch.dtype | None) -> dict[str, Any]:
    """Held-out metrics in the training precision; every rank calls it (FSDP's forward is
    a collective)."""
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            return task.evaluate(model, step)
    finally:
        model.train()


def _find_checkpoint(ckpt_dir: Path, resume: bool, dist: Distributed
                     ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: None for a fresh run, or for --resume of a run
    killed before its first checkpoint was complete. Rank 0 chooses and every rank takes
    its choice (or its error): ranks looking each for themselves could disagree on a
    shared filesystem that caches attributes."""
    if not resume:
        return None
    choice: tuple[str, Any, Any] = ("none", None, None)
    if dist.is_main:
        try:
            found = ckpt.find_latest(ckpt_dir)
            if found is None and ckpt.any_checkpoint(ckpt_dir):
                # all damaged: starting over would overwrite them
                raise BertforgeError(f"--resume: no checkpoint in {ckpt_dir} verifies (see "
                                     f"the warnings above); move them away to start over")
            if found is not None:
                choice = ("found", str(found[0]), found[1])
        except BertforgeError as e:
            choice = ("error", str(e), None)
    kind, value, saved = dist.broadcast_object(choice)
    if kind == "error":
        raise BertforgeError(value)
    if kind == "none":
        if dist.is_main:
            print(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0",
                  file=sys.stderr)
        return None
    return Path(value), saved


def _save(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          state: TrainState, task: Task, cfg: TrainConfig, dist: Distributed,
          device: torch.device) -> None:
    """A checkpoint of the full state; a collective (FSDP gathers its shards)."""
    weights = dist.model_state(model)
    optimizer_state = dist.optimizer_state(model, optimizer)
    rngs = dist.gather_objects(rng_state(device))
    if dist.is_main:
        record = {**state.state_dict(device), "epoch": task.epoch_at(state.step),
                  "world_size": dist.world_size, "strategy": dist.strategy}
        if dist.enabled:
            record["rng_ranks"] = rngs
        ckpt.save_checkpoint(ckpt_dir, state.step, weights, optimizer_state, record,
                             cfg.keep_last)
    dist.barrier()


def _rank_rng(state: dict[str, Any], dist: Distributed, seed: int,
              where: str) -> dict[str, str] | None:
    """This rank's saved RNG when the world size is the one that saved. Otherwise data
    order and masks still continue exactly (they depend on the step alone), but dropout's
    random streams start afresh: each rank is reseeded and None returned."""
    saved = state.get("rng_ranks") or [state.get("rng")]
    if not isinstance(saved, list) or not all(isinstance(r, dict) for r in saved):
        raise BertforgeError(f"{where}: rng is missing or not a random generator state")
    if len(saved) == dist.world_size:
        return saved[dist.rank]
    torch.manual_seed(seed + 1_000_003 * dist.rank + state["step"])
    if dist.is_main:
        print(f"resuming a run saved by {len(saved)} process(es) with {dist.world_size}: "
              f"data order and masks continue exactly; dropout's random stream restarts",
              file=sys.stderr)
    return None
