"""The one training loop, shared by pretraining and fine-tuning.

A `Task` says what a step's micro-batches are and how to score them; `fit` does the
rest: gradient accumulation with the loss normalised over the whole global batch,
bf16 autocast, clipping, the learning-rate schedule, evaluation, metrics.jsonl,
progress output, atomic checkpoints, exact resume and a checkpoint on SIGTERM/SIGINT.
The whole training state is (weights, optimizer, step, tokens, elapsed, RNG): the data
position is the step itself, because batches are a pure function of the step.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from bertforge import checkpoint as ckpt
from bertforge.config import TrainConfig
from bertforge.errors import BertforgeError, Interrupted
from bertforge.optim import build_optimizer, lr_at, progress
from bertforge.runtime import autocast


class Task(Protocol):
    """What `fit` trains on."""

    tokens_per_step: int

    def micro_batches(self, step: int) -> list[Any]:
        """This process's micro-batches of the global batch at `step`."""

    def count(self, micro: Any) -> int:
        """How many loss terms a micro-batch holds (masked tokens, examples)."""

    def loss_sum(self, model: torch.nn.Module, micro: Any) -> tuple[torch.Tensor, dict]:
        """The summed (not averaged) loss of a micro-batch, and extra summed metrics."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics."""

    def epoch_at(self, step: int) -> float:
        ...


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (never mid-update)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut short by a kill
                    continue
        tmp = path.with_name(f".{path.name}.tmp")  # a kill mid-rewrite must not lose history
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, cfg: TrainConfig, start_step: int, enabled: bool, name: str):
        self.cfg, self.enabled, self.name = cfg, enabled, name
        self.bar = None
        self.last_print = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            total = cfg.max_steps if cfg.max_steps else None
            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True,
                            desc=name, file=sys.stderr)

    def update(self, step: int, elapsed: float, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        p = progress(self.cfg, step, elapsed)
        eta = (elapsed / p - elapsed) if p > 0 else float("nan")
        text = f"loss {loss:.3f} | {tokens_per_s:,.0f} tok/s | eta {_duration(eta)}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text, refresh=False)
        elif time.monotonic() - self.last_print > 30 or step == 1:
            self.last_print = time.monotonic()
            print(f"{self.name}: step {step} | {100 * p:.0f}% | {text}", file=sys.stderr,
                  flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rng_state() -> dict[str, str]:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    state = {"torch": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = enc(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `checkpoint.model_state` (tied tensors stored once)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    stored = {own[k].data_ptr() for k in weights if k in own}
    truly_missing = [k for k in missing if own[k].data_ptr() not in stored]
    if truly_missing or unexpected:
        raise BertforgeError(f"checkpoint does not match the model: missing {truly_missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: Path,
        device: torch.device, dtype: torch.dtype | None, resume: bool = False,
        show_progress: bool = True, is_main: bool = True,
        on_checkpoint: Callable[[Path], None] | None = None,
        name: str = "train") -> dict[str, Any]:
    """Train `model` on `task` until max_steps or the time budget; returns the final metrics.

    `name` labels the progress output ("pretrain", "finetune sst2", ...).
    """
    if not cfg.max_steps and not cfg.time_budget:
        raise BertforgeError("give --max-steps or --time-budget (how long to train)")
    optimizer = build_optimizer(model, cfg)
    ckpt_dir = run_dir / "checkpoints"
    step, tokens, elapsed_before, skipped = 0, 0, 0.0, 0
    found = ckpt.find_latest(ckpt_dir) if resume else None
    if resume and found is None:
        if ckpt.any_checkpoint(ckpt_dir):  # all damaged: starting over would overwrite them
            raise BertforgeError(f"--resume: no checkpoint in {ckpt_dir} verifies (see the "
                                 f"warnings above); move them away to start over")
        if is_main:  # killed before its first checkpoint was complete
            print(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0",
                  file=sys.stderr)
    if found is not None:
        path, state = found
        load_model_weights(model, ckpt.load_weights(path))
        optimizer.load_state_dict(ckpt.load_optimizer_state(path))
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        skipped = state.get("skipped_steps", 0)
        _set_rng_state(state["rng"])
        if is_main:
            print(f"resuming from {path.name} (step {step}, {tokens:,} tokens)", file=sys.stderr)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step if found else None, enabled=is_main)
    bar = Progress(cfg, step, show_progress and is_main, name)

    def save() -> Path | None:
        if not is_main:
            return None
        state = {"tokens": tokens, "elapsed_s": elapsed, "epoch": task.epoch_at(step),
                 "skipped_steps": skipped, "rng": _rng_state()}
        path = ckpt.save_checkpoint(ckpt_dir, step, model, optimizer, state, cfg.keep_last)
        if on_checkpoint:
            on_checkpoint(path)
        return path

    def run_eval() -> dict[str, Any]:
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            result = task.evaluate(model)
        model.train()
        if result:
            record = {"kind": "eval", "step": step, "tokens": tokens,
                      "elapsed_s": round(elapsed, 3), **result}
            metrics.write(record)
            bar.write(f"eval step {step}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        return result

    model.train()
    start = time.monotonic()
    paused = 0.0  # evaluation and checkpoint time: not training time, not in the budget
    elapsed = elapsed_before
    window_tokens, window_start = 0, start

    def off_clock(work: Callable[[], Any]) -> Any:
        nonlocal paused, window_tokens, window_start
        t0 = time.monotonic()
        try:
            return work()
        finally:
            now = time.monotonic()
            paused += now - t0
            window_tokens, window_start = 0, now  # tokens/s measures training alone

    last_saved = step if found else -1
    final_eval: dict[str, Any] = {}
    with _SignalFlag() as stop:
        while True:
            elapsed = elapsed_before + time.monotonic() - start - paused
            if (cfg.max_steps and step >= cfg.max_steps) or \
                    (cfg.time_budget and elapsed >= cfg.time_budget):
                break
            lr = lr_at(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = task.micro_batches(step)
            total = sum(task.count(m) for m in micro)  # the whole global batch's loss terms
            loss = torch.zeros((), device=device)
            extra: dict[str, float] = {}
            for m in micro:
                with autocast(device, dtype):
                    loss_sum, more = task.loss_sum(model, m)
                (loss_sum / max(total, 1)).backward()
                loss += loss_sum.detach()
                for k, v in more.items():
                    extra[k] = extra.get(k, 0.0) + float(v)
            loss = loss.item() / max(total, 1)
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 and math.isfinite(loss) else float("nan"))
            # A non-finite gradient norm with a finite loss would still poison the weights.
            finite = math.isfinite(loss) and (cfg.grad_clip == 0 or math.isfinite(grad_norm))
            if finite:
                optimizer.step()
            else:
                what = (f"loss ({loss})" if not math.isfinite(loss)
                        else f"gradient norm ({grad_norm})")
                if cfg.on_nan == "stop":
                    kept = f"step {last_saved}" if last_saved > 0 else "none"
                    raise BertforgeError(
                        f"non-finite {what} at step {step + 1}; stopped without saving it "
                        f"(last checkpoint: {kept}); lower --lr, check the data, or pass "
                        f"--on-nan skip")
                skipped += 1
                note = f"step {step + 1}: non-finite {what}; update skipped ({skipped} so far)"
                if bar.enabled:
                    bar.write(note)
                elif is_main:
                    print(note, file=sys.stderr, flush=True)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += task.tokens_per_step
            window_tokens += task.tokens_per_step
            now = time.monotonic()
            elapsed = elapsed_before + now - start - paused
            tps = window_tokens / max(now - window_start, 1e-9)
            if step % cfg.log_every == 0 or step == 1 or not finite:
                metrics.write({"kind": "train", "step": step,
                               "loss": loss if finite else None, "lr": lr,
                               "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                               **({} if finite else {"skipped": True}),
                               "skipped_steps": skipped, "tokens": tokens,
                               "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3),
                               "epoch": round(task.epoch_at(step), 4),
                               **{k: v / max(total, 1) for k, v in extra.items()}})
                window_tokens, window_start = 0, now
            bar.update(step, elapsed, loss, tps)
            if cfg.eval_every and step % cfg.eval_every == 0:
                final_eval = off_clock(run_eval)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                off_clock(save)
                last_saved = step
            if stop.signum is not None:
                if last_saved != step:
                    save()
                bar.close()
                raise Interrupted(stop.signum, step)
    if not (cfg.eval_every and step % cfg.eval_every == 0 and final_eval):
        final_eval = run_eval()
    if last_saved != step:
        save()
    bar.close()
    return {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3), **final_eval}

