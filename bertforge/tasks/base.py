"""What the training loop asks of a task: the `Task` protocol and the `StepBatch` it hands
over each step.

A task (masked-LM pretraining in `tasks.mlm`, classification in `tasks.classification`)
owns its data and its loss; `bertforge.train` owns everything else. The loop never looks
inside a micro-batch: it moves it to the device and hands it back to the task's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class StepBatch:
    """This process's share of the global batch of one step, on the host."""

    micro: list[Any]  # micro-batches, each with .to(device) and .pin_memory()
    counts: dict[str, int]  # loss terms of each kind in `micro` (masked tokens, pairs, ...)
    tokens: int  # real input tokens in `micro` (padding excluded)
    # What each metric of the task's loss_sum is an average over: metric name -> the name
    # of a count, e.g. {"mlm_accuracy": "mlm"}.
    metric_counts: dict[str, str] = field(default_factory=dict)

    def pin_memory(self) -> StepBatch:
        return StepBatch(
            [m.pin_memory() for m in self.micro], self.counts, self.tokens, self.metric_counts
        )


LossFn = Callable[[torch.nn.Module, Any], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


class Task(Protocol):
    """What `fit` trains on."""

    def batch(self, step: int) -> StepBatch:
        """This process's share of the global batch at `step`: a pure function of it."""

    def loss_sum(
        self, model: torch.nn.Module, micro: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The summed (not averaged) loss of each term of a micro-batch on the device,
        keyed like `StepBatch.counts` (each term is normalised by its count), and extra
        summed metrics as device tensors, each normalised by the count
        `StepBatch.metric_counts` names for it."""

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Held-out metrics of the model after `step` steps."""

    def epoch_at(self, step: int) -> float: ...
