"""torch.compile for the training step: the forward pass and the loss as one graph.

- `compile_loss(loss_fn)`: a task's `loss_sum` (bertforge.tasks.base) compiled, so that
  Inductor fuses the cross-entropy, dropout masks, residual adds, GELU and LayerNorm into
  the kernels around the matmuls. The sizes that vary between micro-batches are marked
  dynamic, so a run compiles once (twice when some micro-batches are padded and others not).
- `ordered_scatter(device)`: on the CPU, PyTorch's deterministic mode, in which Inductor
  adds the embedding gradient with ATen's ordered scatter, not with atomic adds whose order
  changes between runs: a resumed compiled run stays bitwise equal to an uninterrupted one.
- `should_compile(cfg, device)`: `--compile` and `--no-compile` decide; by default a GPU run
  compiles when it is long enough for compiling (a minute or more) to pay (`AUTO_MIN_STEPS`
  steps or an `AUTO_MIN_BUDGET_S` budget) and Triton is there; a CPU run stays eager.
- `CompileCounters`: graph breaks and graphs compiled, which is how
  `bertforge bench --compile` and the tests tell whether compilation works.

Why, with the measurements: docs/performance.md#torchcompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

LossFn = Callable[[torch.nn.Module, Any], Any]


def mark_dynamic(micro: Any) -> None:
    """Mark the dimensions of `micro` that vary between micro-batches as dynamic, so that
    a new size does not recompile: its class's `DYNAMIC_DIMS`, {field: dimensions}."""
    for name, dims in getattr(micro, "DYNAMIC_DIMS", {}).items():
        t = getattr(micro, name)
        # Sizes 0 and 1 are always specialised: such a dimension stays static (a rare
        # micro-batch of one masked token or one example compiles a graph of its own).
        dims = [d for d in dims if t is not None and t.shape[d] > 1]
        if dims:
            torch._dynamo.mark_dynamic(t, dims)


def compile_loss(loss_fn: LossFn, **options: Any) -> LossFn:
    """`loss_fn(model, micro)` compiled, with `micro`'s varying sizes marked dynamic."""
    compiled = torch.compile(loss_fn, **options)

    def call(model: torch.nn.Module, micro: Any) -> Any:
        mark_dynamic(micro)
        return compiled(model, micro)

    return call


AUTO_MIN_STEPS = 1000
AUTO_MIN_BUDGET_S = 600.0


def should_compile(cfg: Any, device: torch.device) -> bool:
    """cfg.compile when set (a TrainConfig); else whether this is a GPU run long enough
    for compiling to pay, with the compiler at hand (see the module docstring)."""
    if cfg.compile is not None:
        return bool(cfg.compile)
    long_enough = (cfg.max_steps or 0) >= AUTO_MIN_STEPS or (
        cfg.time_budget or 0.0
    ) >= AUTO_MIN_BUDGET_S
    return device.type == "cuda" and long_enough and compiler_available(device)


def compiler_available(device: torch.device) -> bool:
    """Whether Inductor can build kernels for `device`: on the CPU a C++ compiler and
    Python's headers (its kernels are Python extension modules), on CUDA Triton."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
        return (
            shutil.which(cxx) is not None or shutil.which("c++") is not None
        ) and headers.is_file()
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


@contextlib.contextmanager
def ordered_scatter(device: torch.device) -> Iterator[None]:
    """Within the block, compiled kernels on the CPU add in a fixed order (see the module
    docstring). Inductor reads the mode when it generates code, which for the backward
    pass happens at its first call: the whole training loop runs inside. Eager CPU
    kernels are deterministic already; only PyTorch's warning for the rare one that is
    not is turned on (warn_only). GPUs keep their fast atomic kernels."""
    if device.type != "cpu":
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@dataclasses.dataclass
class CompileCounters:
    """Dynamo's graph breaks and compiled graphs since `start()`."""

    graph_breaks: int = 0
    graphs: int = 0

    @staticmethod
    def _now() -> tuple[int, int]:
        counters = torch._dynamo.utils.counters
        return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]

    def start(self) -> CompileCounters:
        self._base = self._now()
        return self

    def read(self) -> CompileCounters:
        breaks, graphs = self._now()
        return CompileCounters(breaks - self._base[0], graphs - self._base[1])
