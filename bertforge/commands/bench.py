"""`bertforge bench`: training throughput, MFU and peak memory, against transformers.

Every figure is a full training step (forward, backward, optimizer) on the same config,
batch and masked tokens, timed in one process; transformers' BertForMaskedLM is timed in
each of eager/sdpa attention x fp32/bf16 and its best setting is reported. Model FLOPs
utilisation counts *useful* FLOPs (docs/performance.md#bench): per token, with L layers,
hidden H, feed-forward I, sequence length T, vocab V and masking rate r, a forward pass costs

    L * (2 * (4 * H**2 + 2 * H * I)  +  4 * T * H)  +  r * (2 * H**2 + 2 * H * V)
         (QKV, out, FFN matmuls)        (QK^T, PV)     (MLM transform + decoder)

and a training step three times that (`flops_per_token`). MFU divides the achieved useful
FLOP/s by the peak matmul FLOP/s this command measures on the machine (`matmul_peak`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge.config import ModelConfig, TrainConfig
from bertforge.data.masking import MaskedBatch, Masker
from bertforge.train.compiling import CompileCounters, compile_loss, ordered_scatter
from bertforge.train.optim import build_optimizer
from bertforge.train.runtime import autocast, configure, keep_freed_memory, resolve_device

SPECIAL_IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_rate: float = 0.15) -> float:
    """Useful training FLOPs per token (see the module docstring)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layer = 2 * (4 * h * h + 2 * h * i) + 4 * seq_len * h
    head = mask_rate * (2 * h * h + 2 * h * v)
    return 3 * (cfg.num_hidden_layers * layer + head)


def synthetic_batch(
    cfg: ModelConfig, batch_size: int, seq_len: int, seed: int = 0, mask_rate: float = 0.15
) -> MaskedBatch:
    """Random tokens shaped like packed pretraining data, masked as training masks them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(SPECIAL_IDS), cfg.vocab_size, size=(batch_size, seq_len))
    tokens[:, 0], tokens[:, -1] = SPECIAL_IDS["cls"], SPECIAL_IDS["sep"]
    masker = Masker(cfg.vocab_size, SPECIAL_IDS, mask_rate=mask_rate)
    return masker(tokens, np.arange(batch_size), seed, 0)


class _PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM)
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024


def _time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per step after `warmup` untimed steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    n: int | None = None,
    repeats: int = 10,
) -> float:
    """Best achieved FLOP/s of an n x n x n matmul: the machine's practical peak (n: 8192
    on a GPU, which a smaller product does not fill; 2048 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, clocks
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclass
class Measurement:
    name: str
    seconds_per_step: float
    tokens_per_s: float
    peak_memory_bytes: int
    # Compiled rows: dynamo's graph breaks, and the graphs compiled after the first step
    compiled: CompileCounters | None = None

    def as_dict(self) -> dict[str, Any]:
        row = {
            "name": self.name,
            "seconds_per_step": round(self.seconds_per_step, 4),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "peak_memory_mb": round(self.peak_memory_bytes / 2**20, 1),
        }
        if self.compiled is not None:
            row.update(graph_breaks=self.compiled.graph_breaks, recompiles=self.compiled.graphs)
        return row


def _time_compiled(
    step: Callable[[], None], steps: int, warmup: int, device: torch.device
) -> tuple[float, CompileCounters]:
    """`_time_steps` of a compiled step, with the graph breaks and the recompilations
    (graphs compiled after the first step) dynamo counted."""
    counters = CompileCounters().start()
    step()  # compiles
    after_first = counters.read()
    seconds = _time_steps(step, steps, warmup + 1, device)
    final = counters.read()
    return seconds, CompileCounters(final.graph_breaks, final.graphs - after_first.graphs)


def bench_bertforge(
    cfg: ModelConfig,
    batches: list[MaskedBatch],
    device: torch.device,
    dtype: torch.dtype | None,
    steps: int,
    warmup: int,
    compile_model: bool = False,
) -> Measurement:
    """Training steps as `bertforge pretrain` runs them: `train_step` (the same
    normalisation, clipping, NaN guard and fused AdamW) on the pretraining model, cycling
    through `batches`; compiled as `pretrain --compile` compiles (forward and loss)."""
    from bertforge.tasks.base import LossFn
    from bertforge.tasks.mlm import MLM_METRIC_COUNTS, mlm_loss_sum, pretraining_model
    from bertforge.train.step import StepBatch, train_step

    torch.manual_seed(0)
    model = pretraining_model(cfg, "mlm").to(device).train()
    train_cfg = TrainConfig()
    optimizer = build_optimizer(model, train_cfg)
    step_batches = [
        StepBatch([b], {"mlm": b.targets.numel()}, b.real_tokens, MLM_METRIC_COUNTS)
        for b in batches
    ]
    if device.type == "cuda":  # as training's prefetcher hands them over
        step_batches = [b.pin_memory() for b in step_batches]
    loss_fn: LossFn = functools.partial(mlm_loss_sum, vocab_size=cfg.vocab_size)
    if compile_model:
        loss_fn = compile_loss(loss_fn)
    cycle = itertools.cycle(step_batches)

    def step() -> None:
        train_step(
            model,
            optimizer,
            loss_fn,
            next(cycle),
            lr=train_cfg.lr,
            cfg=train_cfg,
            device=device,
            dtype=dtype,
        )

    counted = None
    with _PeakMemory(device) as mem:
        if compile_model:
            with ordered_scatter(device):  # as training runs it
                seconds, counted = _time_compiled(step, steps, warmup, device)
        else:
            seconds = _time_steps(step, steps, warmup, device)
    tokens = batches[0].input_ids.numel()
    precision = "bf16" if dtype else "fp32"
    return Measurement(
        f"bertforge ({precision}{', compiled' if compile_model else ''})",
        seconds,
        tokens / seconds,
        mem.peak,
        counted,
    )


def bench_transformers(
    cfg: ModelConfig,
    batches: list[MaskedBatch],
    device: torch.device,
    attn: str,
    dtype: torch.dtype | None,
    steps: int,
    warmup: int,
    compile_model: bool = False,
) -> Measurement:
    """transformers' BertForMaskedLM trained as run_mlm trains it (labels -100 elsewhere)."""
    import transformers

    from bertforge.hf import model_config_to_hf

    hf_cfg = transformers.BertConfig(
        **{
            k: v
            for k, v in model_config_to_hf(cfg).items()
            if k not in ("architectures", "model_type")
        }
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM._from_config(hf_cfg, attn_implementation=attn)
    model.to(device).train()
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    inputs = []
    for batch in batches:
        ids = batch.input_ids.to(device)
        labels = torch.full_like(ids, -100)
        labels.view(-1)[batch.masked_positions.to(device)] = batch.targets.to(device)
        inputs.append((ids, labels))
    cycle = itertools.cycle(inputs)

    def step() -> None:
        ids, labels = next(cycle)
        with autocast(device, dtype):
            loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counted = None
    with _PeakMemory(device) as mem:
        if compile_model:
            seconds, counted = _time_compiled(step, steps, warmup, device)
        else:
            seconds = _time_steps(step, steps, warmup, device)
    precision = "bf16" if dtype else "fp32"
    return Measurement(
        f"transformers ({attn}, {precision}{', compiled' if compile_model else ''})",
        seconds,
        inputs[0][0].numel() / seconds,
        mem.peak,
        counted,
    )


def run_bench(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    *,
    vs_hf: bool,
    steps: int = 10,
    warmup: int = 3,
    device_name: str = "auto",
    compile_model: bool = False,
    fp32: bool = True,
    hf_compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time bertforge's training step (bf16 where supported; also compiled with
    `compile_model`, also in fp32 with `fp32`) and, with `vs_hf`, transformers' in eager
    and sdpa attention (bf16, and fp32 with `fp32`; also sdpa compiled with `hf_compile`)."""
    from bertforge.train.runtime import resolve_precision

    device = resolve_device(device_name)
    where = configure(device)
    threads = torch.get_num_threads()
    bf16 = resolve_precision("auto", device)
    # Three batches in turn: their masked-token counts differ, as in training.
    batches = [synthetic_batch(cfg, batch_size, seq_len, seed=s) for s in range(3)]
    peak = matmul_peak(device, bf16 or torch.float32)
    flops = flops_per_token(cfg, seq_len)
    # Process-wide, so both models run with it (see runtime.keep_freed_memory).
    kept = keep_freed_memory() if device.type == "cpu" else False
    log(
        f"{where}, freed memory {'kept' if kept else 'returned'}; "
        f"measured {'bf16' if bf16 else 'fp32'} matmul "
        f"peak {peak / 1e9:,.0f} GFLOP/s; {flops / 1e6:,.1f} MFLOP per token (training)"
    )

    def report(m: Measurement) -> dict[str, Any]:
        row = m.as_dict()
        row["mfu"] = round(m.tokens_per_s * flops / peak, 4)
        compiled = (
            ""
            if m.compiled is None
            else f"  graph breaks {m.compiled.graph_breaks}, recompiles {m.compiled.graphs}"
        )
        log(
            f"  {m.name:40s} {m.tokens_per_s:11,.0f} tok/s {m.seconds_per_step * 1e3:8.1f} "
            f"ms/step  MFU {100 * row['mfu']:5.1f}%  peak mem {row['peak_memory_mb']:,.0f} MB"
            f"{compiled}"
        )
        return row

    dtypes = ([bf16] if bf16 is not None else []) + ([None] if fp32 or bf16 is None else [])
    ours = [report(bench_bertforge(cfg, batches, device, dtypes[0], steps, warmup))]
    if compile_model:
        ours.append(
            report(
                bench_bertforge(cfg, batches, device, dtypes[0], steps, warmup, compile_model=True)
            )
        )
    for dtype in dtypes[1:]:  # the fp32 path, for reference
        ours.append(report(bench_bertforge(cfg, batches, device, dtype, steps, warmup)))
    result: dict[str, Any] = {
        "device": device.type,
        "device_name": where,
        "threads": threads,
        "keep_freed_memory": kept,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "model": cfg.__dict__,
        "peak_flops": peak,
        "flops_per_token": flops,
        "bertforge": ours,
    }
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    result["best"] = best_ours
    if vs_hf:
        hf = [
            report(bench_transformers(cfg, batches, device, attn, dtype, steps, warmup))
            for attn in ("eager", "sdpa")
            for dtype in dtypes
        ]
        if hf_compile:
            hf.append(
                report(
                    bench_transformers(
                        cfg, batches, device, "sdpa", dtypes[0], steps, warmup, compile_model=True
                    )
                )
            )
        best_hf = max(hf, key=lambda r: r["tokens_per_s"])
        result["transformers"] = hf
        result["best_transformers"] = best_hf
        result["speedup"] = round(best_ours["tokens_per_s"] / best_hf["tokens_per_s"], 2)
        log(
            f"bertforge {best_ours['tokens_per_s']:,.0f} tok/s vs transformers' best "
            f"({best_hf['name']}) {best_hf['tokens_per_s']:,.0f} tok/s: "
            f"{result['speedup']:.2f}x"
        )
    return result


def profile_steps(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    device_name: str = "auto",
    steps: int = 3,
    top: int = 20,
) -> list[dict[str, Any]]:
    """Where a bertforge training step spends its time: the `top` operators and kernels
    by self time on the device (the CPU's time on a CPU), from torch.profiler over
    `steps` steps after two untimed ones."""
    from torch.profiler import ProfilerActivity, profile

    from bertforge.tasks.mlm import MLM_METRIC_COUNTS, mlm_loss_sum, pretraining_model
    from bertforge.train.runtime import resolve_precision
    from bertforge.train.step import StepBatch, train_step

    device = resolve_device(device_name)
    configure(device)
    dtype = resolve_precision("auto", device)
    batch = synthetic_batch(cfg, batch_size, seq_len)
    torch.manual_seed(0)
    model = pretraining_model(cfg, "mlm").to(device).train()
    train_cfg = TrainConfig()
    optimizer = build_optimizer(model, train_cfg)
    step_batch = StepBatch(
        [batch], {"mlm": batch.targets.numel()}, batch.real_tokens, MLM_METRIC_COUNTS
    )
    if device.type == "cuda":
        step_batch = step_batch.pin_memory()

    loss_fn = functools.partial(mlm_loss_sum, vocab_size=cfg.vocab_size)

    def step() -> None:
        train_step(
            model,
            optimizer,
            loss_fn,
            step_batch,
            lr=train_cfg.lr,
            cfg=train_cfg,
            device=device,
            dtype=dtype,
        )

    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {
            "name": e.key,
            "ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
            "share": round(getattr(e, key) / total, 4),
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]
