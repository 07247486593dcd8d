"""Sequence classification and regression as a task: batches, loss and validation.

`ClassificationTask` is the `Task` that `train.fit` runs for `bertforge finetune`. The
global batch of step t is a pure function of (seed, t): epoch t // steps_per_epoch's seeded
permutation, sliced (the last batch of an epoch is smaller), each micro-batch padded to its
own longest example (`length_grouping` puts examples of similar lengths together, to pad
less). The task evaluates once an epoch and keeps the weights of the best epoch on
validation in best/, which is what the command exports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bertforge.config import DEFAULT_MICRO_BATCH
from bertforge.data.labelled import TaskData
from bertforge.fileio import make_dir, write_atomic, write_text_atomic
from bertforge.finetune_config import FinetuneConfig
from bertforge.tasks.base import StepBatch
from bertforge.tasks.scores import compute
from bertforge.weights import model_state, require_finite

if TYPE_CHECKING:
    from bertforge.model.bert import BertForSequenceClassification


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    token_type_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), 1 = real token; None when none is padded
    y: torch.Tensor  # (B,) class ids, or float targets for regression

    # Batches are grouped by length and the epoch's last one is smaller: for
    # torch.compile (bertforge.train.compiling), B and T change from batch to batch.
    DYNAMIC_DIMS: ClassVar[dict[str, tuple[int, ...]]] = {
        "input_ids": (0, 1),
        "token_type_ids": (0, 1),
        "attention_mask": (0, 1),
        "y": (0,),
    }

    def _map(self, f: Any) -> Batch:
        mask = self.attention_mask
        return Batch(
            f(self.input_ids),
            f(self.token_type_ids),
            f(mask) if mask is not None else None,
            f(self.y),
        )

    def to(self, device: torch.device) -> Batch:
        """On `device`; the copy does not block when the batch is in pinned memory."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)


class TokenizedSplit:
    """A split's examples as token ids, unpadded; `batch` pads a selection to its longest
    row."""

    def __init__(
        self, tok: Any, texts: list[str], pairs: list[str] | None, y: np.ndarray | None, pad_id: int
    ):
        encodings = tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        self.ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        self.types = [np.asarray(e.type_ids, dtype=np.int64) for e in encodings]
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.y = y if y is not None else np.zeros(len(texts), dtype=np.int64)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray) -> Batch:
        T = int(self.lengths[index].max())
        ids = np.full((len(index), T), self.pad_id, dtype=np.int64)
        types = np.zeros((len(index), T), dtype=np.int64)
        mask = np.zeros((len(index), T), dtype=np.int64)
        for row, i in enumerate(index.tolist()):
            n = self.lengths[i]
            ids[row, :n], types[row, :n], mask[row, :n] = self.ids[i], self.types[i], 1
        padded = bool((self.lengths[index] < T).any())
        return Batch(
            torch.from_numpy(ids),
            torch.from_numpy(types),
            torch.from_numpy(mask) if padded else None,
            torch.from_numpy(self.y[index]),
        )


@torch.no_grad()
def predict_logits(
    model: BertForSequenceClassification,
    data: TokenizedSplit,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """(N, num_labels) fp32 logits, in the data's order (batched by length: less padding)."""
    order = np.argsort(data.lengths, kind="stable")
    out = np.empty((len(data), model.num_labels), dtype=np.float32)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        b = data.batch(index).to(device)
        out[index] = model(b.input_ids, b.token_type_ids, b.attention_mask).float().cpu().numpy()
    return out


def split_metrics(data: TaskData, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The task's metrics and the mean loss, from logits (N, C) and targets (N,)."""
    if data.regression:
        predictions = logits[:, 0]
        loss = float(np.mean((predictions.astype(np.float64) - y) ** 2))
    else:
        predictions = logits.argmax(-1)
        z = logits.astype(np.float64)
        top = z.max(-1)
        logsumexp = top + np.log(np.exp(z - top[:, None]).sum(-1))
        loss = float(np.mean(logsumexp - z[np.arange(len(y)), y]))
    return {**compute(data.metrics, predictions, y), "eval_loss": loss}


class ClassificationTask:
    """Sequence classification (cross-entropy) or regression (squared error) for `fit`."""

    def __init__(
        self,
        data: TaskData,
        train: TokenizedSplit,
        valid: dict[str, TokenizedSplit],
        cfg: FinetuneConfig,
        device: torch.device,
        best_dir: Path,
    ):
        self.data, self.train, self.valid = data, train, valid
        self.cfg, self.device, self.best_dir = cfg, device, best_dir
        self.batch_size = cfg.train.batch_size
        self.micro_batch_size = min(
            cfg.train.micro_batch_size or DEFAULT_MICRO_BATCH, self.batch_size
        )
        self.steps_per_epoch = math.ceil(len(train) / self.batch_size)
        state = best_dir / "state.json"
        self.best = json.loads(state.read_text()) if state.is_file() else None
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self._new_order(epoch)}  # batches come in epoch order
        return self._orders[epoch]

    def _new_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s example order: a seeded permutation. With length_grouping G,
        each run of G batches is then sorted by length and the full batches shuffled, so
        a batch holds examples of similar lengths (less padding); the short one stays last."""
        rng = np.random.default_rng([self.cfg.train.seed, epoch])
        order = rng.permutation(len(self.train))
        G, B = self.cfg.length_grouping, self.batch_size
        if G:
            runs = np.split(order, range(G * B, len(order), G * B))
            order = np.concatenate(
                [r[np.argsort(-self.train.lengths[r], kind="stable")] for r in runs]
            )
            full = len(order) // B
            batches = order[: full * B].reshape(full, B)[rng.permutation(full)]  # (full, B)
            order = np.concatenate([batches.reshape(-1), order[full * B :]])
        return order

    def batch(self, step: int) -> StepBatch:
        """The examples of step `step` (the last batch of an epoch is smaller), in
        micro-batches each padded to its longest example."""
        epoch, j = divmod(step, self.steps_per_epoch)
        B, mb = self.batch_size, self.micro_batch_size
        index = self._order(epoch)[j * B : (j + 1) * B]
        micro = [self.train.batch(index[s : s + mb]) for s in range(0, len(index), mb)]
        return StepBatch(
            micro,
            {"examples": len(index)},
            int(self.train.lengths[index].sum()),
            {"accuracy": "examples"},
        )

    def loss_sum(
        self, model: torch.nn.Module, micro: Batch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logits = model(micro.input_ids, micro.token_type_ids, micro.attention_mask)  # (B, C)
        if self.data.regression:
            return {"examples": F.mse_loss(logits[:, 0].float(), micro.y, reduction="sum")}, {}
        loss = F.cross_entropy(logits.float(), micro.y, reduction="sum")
        return {"examples": loss}, {"accuracy": (logits.detach().argmax(-1) == micro.y).sum()}

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        result: dict[str, Any] = {"epoch": round(self.epoch_at(step), 4)}
        scores = []
        for name, split in self.valid.items():
            logits = predict_logits(
                cast("BertForSequenceClassification", model),
                split,
                self.cfg.eval_batch_size,
                self.device,
            )
            values = split_metrics(self.data, logits, split.y)
            result.update({(f"{k}_{name}" if name else k): v for k, v in values.items()})
            scores += [values[k] for k in self.data.score]
        result["score"] = float(np.mean(scores))
        # A best from a later step belongs to an attempt abandoned by a resume: replace it.
        if self.best is None or step <= self.best["step"] or result["score"] > self.best["score"]:
            self._save_best(model, step, result)
        return result

    def _save_best(self, model: torch.nn.Module, step: int, result: dict[str, Any]) -> None:
        """Weights under a new name, then state.json naming them replaced atomically, then
        the previous weights removed: a kill at any point leaves a consistent best/."""
        make_dir(self.best_dir)
        name = f"step-{step:06d}.safetensors"
        weights = model_state(model)
        require_finite(weights, f"not keeping the weights of step {step} as the best")
        write_atomic(self.best_dir / name, lambda tmp: save_file(weights, str(tmp)))
        self.best = {"step": step, "weights": name, **result}
        write_text_atomic(self.best_dir / "state.json", json.dumps(self.best, indent=1) + "\n")
        for old in self.best_dir.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink()
