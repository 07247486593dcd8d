"""AdamW with BERT's parameter groups, and learning-rate schedules.

Schedules are functions of run *progress* in [0, 1], not of the step alone: progress is
step / max_steps, elapsed / time_budget, or the larger of the two when both are set. A
time-budgeted run therefore reaches a learning rate of zero exactly at its deadline
(as Cramming does), whatever speed the hardware turns out to have. Its warmup, though,
is also counted in steps: a post-LN BERT needs its warmup in updates, and a first minute
that runs slowly (a busy machine) must not squeeze it to a handful of steps.
"""

from __future__ import annotations

import inspect
import math

import torch

from bertforge.config import TrainConfig

# The fewest steps a time-budgeted run's warmup (a warmup_fraction of the budget) lasts.
MIN_WARMUP_STEPS = 100


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (as BERT)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {}
    # The fused kernel is one pass over all parameters; fall back to foreach elsewhere.
    if "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **kwargs
        )
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            foreach=True,
        )


def progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far through the run we are, in [0, 1]."""
    parts = []
    if cfg.max_steps:
        parts.append(step / cfg.max_steps)
    if cfg.time_budget:
        parts.append(elapsed / cfg.time_budget)
    return min(1.0, max(parts)) if parts else 0.0


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """The learning rate of the update after `step` steps and `elapsed` seconds of training:
    linear warmup (over warmup_steps steps, or over the first warmup_fraction of the run),
    then linear or cosine decay to zero at the end of the run (or constant).

    With a time budget and a warmup_fraction, the warmup is the longer of the two:
    warmup_fraction x time_budget seconds of training, and MIN_WARMUP_STEPS steps, so the
    warmup factor is min(elapsed / (fraction x budget), (step + 1) / MIN_WARMUP_STEPS).
    The decay still ends at the deadline; where the step floor holds the warmup past the
    fraction, the rate is the lower of the warmup and the decay, so it never jumps.
    """
    p = progress(cfg, step, elapsed)
    if cfg.warmup_steps is not None:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        # Decay starts where warmup ends; with a time budget alone, from the start.
        w = min(1.0, cfg.warmup_steps / cfg.max_steps) if cfg.max_steps else 0.0
    else:
        w = cfg.warmup_fraction or 0.0
        warm = min(1.0, p / w) if w > 0 else 1.0
        if cfg.time_budget and w > 0:  # however slowly the first seconds go
            warm = min(warm, (step + 1) / MIN_WARMUP_STEPS)
        if step == 0 and w > 0:
            warm = max(warm, 1e-3)  # the very first update should not be exactly zero
    if cfg.schedule == "constant":
        return cfg.lr * warm
    rest = max(0.0, (p - w) / (1.0 - w)) if w < 1 else 1.0
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * rest))
    else:
        decay = 1.0 - rest
    return cfg.lr * min(warm, decay)
