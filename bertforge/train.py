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
from bertforge.distributed import SINGLE, Distributed
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


def _terms(value: Any) -> dict[str, Any]:
    """A task's count or loss sum as {term: value}: one unnamed term, or its own dict."""
    return value if isinstance(value, dict) else {"loss": value}


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: Path,
        device: torch.device, dtype: torch.dtype | None, resume: bool = False,
        show_progress: bool = True, is_main: bool = True,
        on_checkpoint: Callable[[Path], None] | None = None,
        name: str = "train", dist: Distributed = SINGLE) -> dict[str, Any]:
    """Train `model` on `task` until max_steps or the time budget; returns the final metrics.

    `name` labels the progress output ("pretrain", "finetune sst2", ...). Under torchrun,
    `dist` wraps the model (DDP or FSDP) and every rank calls `fit`; only rank 0 writes
    metrics, progress and checkpoints. A task may have several loss terms (MLM and NSP):
    `count` and `loss_sum` then return {term: value}, and each term is normalised by its
    own count over the global batch.
    """
    if not cfg.max_steps and not cfg.time_budget:
        raise BertforgeError("give --max-steps or --time-budget (how long to train)")
    is_main = is_main and dist.is_main
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
    if found is not None:  # weights go in before sharding: every rank reads the full file
        load_model_weights(model, ckpt.load_weights(found[0]))
    wrapped = dist.wrap(model, device, dtype)
    if cfg.compile:  # `model` stays the plain module: its state_dict keys carry no _orig_mod.
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer(model, cfg)
    if found is not None:
        path, state = found
        dist.load_optimizer_state(model, optimizer, ckpt.load_optimizer_state(path))
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        skipped = state.get("skipped_steps", 0)
        _restore_rng(state, dist, cfg.seed, is_main)
        if is_main:
            print(f"resuming from {path.name} (step {step}, {tokens:,} tokens)", file=sys.stderr)
    elif dist.rank > 0:  # same initial weights everywhere, but each rank its own dropout
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step if found else None, enabled=is_main)
    bar = Progress(cfg, step, show_progress and is_main, name)

    def save() -> Path | None:
        """A collective: every rank calls it; rank 0 writes."""
        weights = dist.model_state(model)
        optimizer_state = dist.optimizer_state(model, optimizer)
        rngs = dist.gather_objects(_rng_state())
        path = None
        if is_main:
            state = {"tokens": tokens, "elapsed_s": elapsed, "epoch": task.epoch_at(step),
                     "skipped_steps": skipped, "rng": rngs[0],
                     "world_size": dist.world_size, "strategy": dist.strategy}
            if dist.enabled:
                state["rng_ranks"] = rngs
            path = ckpt.save_checkpoint(ckpt_dir, step, weights, optimizer_state, state,
                                        cfg.keep_last)
            if on_checkpoint:
                on_checkpoint(path)
        dist.barrier()
        return path

    def run_eval() -> dict[str, Any]:
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            result = task.evaluate(model)  # every rank: FSDP's forward is a collective
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
            micro = task.micro_batches(step)
            local = {k: float(sum(_terms(task.count(m))[k] for m in micro))
                     for k in _terms(task.count(micro[0]))}
            # One collective: the global count of each loss term, and rank 0's clock, so
            # that every rank normalises alike and stops at the same step.
            elapsed = elapsed_before + time.monotonic() - start - paused
            *totals, elapsed = dist.all_reduce([*local.values(),
                                                elapsed if dist.is_main else 0.0])
            counts = dict(zip(local, totals))
            if (cfg.max_steps and step >= cfg.max_steps) or \
                    (cfg.time_budget and elapsed >= cfg.time_budget):
                break
            lr = lr_at(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = {k: torch.zeros((), device=device) for k in counts}
            extra: dict[str, float] = {}
            for i, m in enumerate(micro):
                with dist.sync_gradients(i == len(micro) - 1):
                    with autocast(device, dtype):
                        out, more = task.loss_sum(wrapped, m)
                    terms = _terms(out)
                    loss_t = None
                    for k, v in terms.items():
                        part = v / max(counts[k], 1)
                        loss_t = part if loss_t is None else loss_t + part
                    # DDP and FSDP average gradients over ranks; the global batch sums them.
                    (loss_t * dist.world_size if dist.enabled else loss_t).backward()
                for k, v in terms.items():
                    sums[k] += v.detach()
                for k, v in more.items():
                    extra[k] = extra.get(k, 0.0) + float(v)
            extra_names = sorted(extra)
            reduced = dist.all_reduce([*(v.item() for v in sums.values()),
                                       *(extra[k] for k in extra_names),
                                       float(stop.signum is not None)])
            term_loss = {k: v / max(counts[k], 1) for k, v in zip(sums, reduced)}
            extra = dict(zip(extra_names, reduced[len(sums):-1]))
            stopping = reduced[-1] > 0
            loss = sum(term_loss.values())
            grad_norm = (dist.clip_grad_norm(model, cfg.grad_clip)
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
                first = next(iter(counts))
                metrics.write({"kind": "train", "step": step,
                               "loss": loss if finite else None, "lr": lr,
                               **({f"{k}_loss": v for k, v in term_loss.items()}
                                  if len(term_loss) > 1 and finite else {}),
                               "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                               **({} if finite else {"skipped": True}),
                               "skipped_steps": skipped, "tokens": tokens,
                               "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3),
                               "epoch": round(task.epoch_at(step), 4),
                               **{k: v / max(counts.get(k.split("_")[0], counts[first]), 1)
                                  for k, v in extra.items()}})
                window_tokens, window_start = 0, now
            bar.update(step, elapsed, loss, tps)
            if cfg.eval_every and step % cfg.eval_every == 0:
                final_eval = off_clock(run_eval)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                off_clock(save)
                last_saved = step
            if stopping or (not dist.enabled and stop.signum is not None):
                if last_saved != step:
                    save()
                bar.close()
                raise Interrupted(stop.signum or signal.SIGTERM, step)
    if not (cfg.eval_every and step % cfg.eval_every == 0 and final_eval):
        final_eval = run_eval()
    if last_saved != step:
        save()
    bar.close()
    return {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3), **final_eval}


def _restore_rng(state: dict[str, Any], dist: Distributed, seed: int, is_main: bool) -> None:
    """Each rank continues its own random stream (dropout) when the world size is the one
    that saved; otherwise data order and masks still continue exactly (they depend on
    the step alone), but dropout streams start afresh."""
    saved = state.get("rng_ranks") or [state["rng"]]
    if len(saved) == dist.world_size:
        _set_rng_state(saved[dist.rank])
        return
    torch.manual_seed(seed + 1_000_003 * dist.rank + state["step"])
    if is_main:
        print(f"resuming a run saved by {len(saved)} process(es) with {dist.world_size}: "
              f"data order and masks continue exactly; dropout's random stream restarts",
              file=sys.stderr)
