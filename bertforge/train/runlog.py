"""What a run reports as it trains: metrics.jsonl and the progress output.

metrics.jsonl holds one JSON object per line: a "train" line every `log_every` steps (and
for the first and any skipped step) with the loss and its terms, lr, grad_norm,
skipped_steps, tokens, throughput, training time, epoch and the task's metrics; an "eval"
line with the held-out metrics and the `precision` they were computed in. Every field:
docs/run-directory.md#metricsjsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bertforge.config import TrainConfig
from bertforge.fileio import append_text, write_text_atomic
from bertforge.train.optim import progress
from bertforge.train.step import StepResult


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
        write_text_atomic(path, "".join(k + "\n" for k in kept))  # a kill keeps the history

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_text(self.path, json.dumps(record) + "\n")


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, cfg: TrainConfig, start_step: int, enabled: bool, name: str):
        self.cfg, self.enabled, self.name = cfg, enabled, name
        self.bar = None
        self.last_print = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            total = cfg.max_steps if cfg.max_steps else None
            self.bar = tqdm(
                total=total,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                desc=name,
                file=sys.stderr,
            )

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
            print(
                f"{self.name}: step {step} | {100 * p:.0f}% | {text}", file=sys.stderr, flush=True
            )

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


class RunLog:
    """metrics.jsonl and the progress output of one `fit`; silent on ranks other than 0.

    Throughput is measured over training time (the clock `fit` keeps, with evaluation
    and checkpoints off it) since the previous train line.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        start_step: int,
        resumed: bool,
        enabled: bool,
        show_progress: bool,
        name: str,
        elapsed: float,
        run_config: dict[str, Any] | None = None,
    ):
        from bertforge.train.tracking import open_trackers

        self.cfg = cfg
        self.metrics = MetricsLog(
            run_dir / "metrics.jsonl", start_step if resumed else None, enabled=enabled
        )
        # TensorBoard / W&B, when asked for: they get every record metrics.jsonl gets.
        self.trackers = open_trackers(run_dir, cfg, run_config, name) if enabled else None
        self.bar = Progress(cfg, start_step, enabled and show_progress, name)
        self.enabled = enabled
        self.window_tokens, self.window_start = 0, elapsed

    def train(
        self,
        step: int,
        tokens: int,
        skipped: int,
        elapsed: float,
        epoch: float,
        lr: float,
        result: StepResult,
    ) -> None:
        self.window_tokens += result.tokens
        tps = self.window_tokens / max(elapsed - self.window_start, 1e-9)
        if step % self.cfg.log_every == 0 or step == 1 or not result.applied:
            finite = result.applied
            self._write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": result.loss if finite else None,
                    "lr": lr,
                    **(
                        {f"{k}_loss": v for k, v in result.terms.items()}
                        if len(result.terms) > 1 and finite
                        else {}
                    ),
                    "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                    **({} if finite else {"skipped": True}),
                    "skipped_steps": skipped,
                    "tokens": tokens,
                    "tokens_per_s": round(tps, 1),
                    "elapsed_s": round(elapsed, 3),
                    "epoch": round(epoch, 4),
                    **result.metrics,
                }
            )
            self.window_tokens, self.window_start = 0, elapsed
        if not result.applied and self.cfg.on_nan == "skip":
            self.note(
                f"step {step}: non-finite {result.problem}; update skipped ({skipped} so far)"
            )
        self.bar.update(step, elapsed, result.loss, tps)

    def eval(self, step: int, tokens: int, elapsed: float, result: dict[str, Any]) -> None:
        if not result:
            return
        self._write(
            {
                "kind": "eval",
                "step": step,
                "tokens": tokens,
                "elapsed_s": round(elapsed, 3),
                **result,
            }
        )
        self.bar.write(
            f"eval step {step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        )

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def note(self, text: str) -> None:
        """A line that matters even with --quiet (a skipped update)."""
        if self.bar.enabled:
            self.bar.write(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self, failed: bool = False) -> None:
        """End the progress output and the trackers (a failed run is marked so in W&B)."""
        self.bar.close()
        if self.trackers is not None:
            self.trackers.close(failed)
