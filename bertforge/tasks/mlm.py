"""Masked-LM pretraining as a task: its batches, its loss and its held-out metrics.

`MLMTask` is what `train.fit` runs for `bertforge pretrain`: masked micro-batches of the
prepared shards (sentence pairs first, for mlm+nsp and mlm+sop), a loss summed over the
masked tokens only, and held-out evaluation. Held-out sequences are masked with a fixed
seed (EVAL_MASK_SEED) and always with token masking, so every checkpoint of every run is
scored on the same masked tokens; training's evaluation and `bertforge evaluate` share
`heldout_metrics`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.config import ModelConfig, RunConfig
from bertforge.data.loader import PretrainBatches, ShardedSequences, eval_batches
from bertforge.data.masking import MaskedBatch, Masker, build_masker
from bertforge.data.pairs import PairBuilder, PairedMasker, pair_kind
from bertforge.model.bert import BertForPreTraining
from bertforge.model.ops import cross_entropy_and_hits
from bertforge.tasks.base import StepBatch

EVAL_MASK_SEED = 20181011  # the day BERT appeared on arXiv
EVAL_BATCH_SIZE = 64  # sequences per forward pass, in training's evaluation and `evaluate`


class MLMTask:
    """Masked-LM over prepared shards: sparse prediction at the masked positions only.

    With `data.objective` mlm+nsp or mlm+sop, each training sequence is first made into a
    sentence pair (bertforge.data.pairs) and the 2-way head is trained too: two loss terms,
    MLM normalised by the masked tokens and NSP/SOP by the pairs of the global batch.
    Held-out metrics are computed in `dtype`, as `bertforge evaluate` computes them.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data_dir: Path | list[Path],
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
    ):
        train = ShardedSequences(data_dir, "train")
        manifest = train.manifest
        first = train.data_dirs[0]  # of one or several; they share the tokenizer
        self.masker = build_masker(cfg.data, first, manifest)
        # Held-out scoring always uses token masking, whatever the training variant.
        self.eval_masker = build_masker(cfg.data, first, manifest, for_eval=True)
        t = cfg.train
        self.objective = cfg.data.objective
        self.pair_kind = pair_kind(cfg.data.objective)  # 'nsp', 'sop' or None (plain MLM)
        batch_masker = (
            self.masker
            if self.pair_kind is None
            else PairedMasker(
                self.masker, PairBuilder(train, manifest["special_token_ids"], self.pair_kind)
            )
        )
        # The command has resolved an unset micro-batch size by the time batches are drawn.
        micro_batch_size = cast(int, t.micro_batch_size)
        self.batches = PretrainBatches(
            train, batch_masker, t.batch_size, micro_batch_size, t.seed, rank, world_size
        )
        self.valid = ShardedSequences(data_dir, "valid")
        self.device, self.dtype = device, dtype
        self.eval_sequences = t.eval_sequences
        self.vocab_size = cfg.model.vocab_size

    def batch(self, step: int) -> StepBatch:
        """This rank's micro-batches of step `step`, masked, with their counts: masked
        tokens ("mlm") and, with NSP/SOP, labelled pairs (-100: no pair could be made)."""
        micro = list(self.batches.micro_batches(step))
        counts = {"mlm": sum(m.targets.numel() for m in micro)}
        if self.pair_kind is not None:
            counts[self.pair_kind] = sum(m.labelled_pairs for m in micro)
        return StepBatch(micro, counts, sum(m.real_tokens for m in micro), MLM_METRIC_COUNTS)

    def loss_sum(
        self, model: torch.nn.Module, micro: MaskedBatch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return mlm_loss_sum(model, micro, self.pair_kind, self.vocab_size)

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        if len(self.valid) == 0:
            return {}
        return heldout_metrics(
            model,
            self.valid,
            self.eval_masker,
            self.objective,
            self.device,
            self.dtype,
            self.eval_sequences,
        )

    def epoch_at(self, step: int) -> float:
        return self.batches.epoch_at(step)


def pretraining_model(config: ModelConfig, objective: str) -> BertForPreTraining:
    """A freshly initialised BertForPreTraining for `objective`. Under plain MLM the pooler
    and NSP head get no gradient; they are frozen, so DDP and FSDP need not wait for one
    (and AdamW would skip them anyway)."""
    model = BertForPreTraining(config)
    if objective == "mlm":
        for module in (model.bert.pooler, model.seq_relationship):
            module.requires_grad_(False)
    return model


# What each metric of `mlm_loss_sum` is an average over: the masked tokens, or the pairs.
MLM_METRIC_COUNTS = {"mlm_accuracy": "mlm", "nsp_accuracy": "nsp", "sop_accuracy": "sop"}


def mlm_loss_sum(
    model: torch.nn.Module,
    micro: MaskedBatch,
    pair_kind: str | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The summed MLM loss of a micro-batch (and NSP/SOP's, for `pair_kind`), with the
    summed accuracies; everything stays on the device. Given the model's `vocab_size`,
    the decoder's output stays on the padded vocabulary (see model.MaskedLMHead)."""
    logits, pair_logits = model(
        micro.input_ids,
        token_type_ids=micro.token_type_ids,
        attention_mask=micro.attention_mask,
        masked_positions=micro.masked_positions,
        padded_vocab=vocab_size is not None,
        next_sentence=pair_kind is not None,
    )  # (N, Vp), (B, 2)
    loss, hits = cross_entropy_and_hits(logits, micro.targets, vocab_size)
    losses, metrics = {"mlm": loss}, {"mlm_accuracy": hits}
    if pair_kind is not None:
        labels = micro.next_sentence_label  # (B,)
        assert labels is not None  # a PairedMasker labels every batch
        # Summed in fp32; labels of -100 add nothing to the loss and never match an argmax.
        losses[pair_kind] = F.cross_entropy(pair_logits.float(), labels, reduction="sum")
        metrics[f"{pair_kind}_accuracy"] = (pair_logits.detach().argmax(-1) == labels).sum()
    return losses, metrics


# ------------------------------------------------------------------ held-out metrics


def heldout_metrics(
    model: torch.nn.Module,
    sequences: ShardedSequences,
    masker: Masker,
    objective: str,
    device: torch.device,
    dtype: torch.dtype | None,
    max_sequences: int = 0,
) -> dict:
    """MLM metrics, and the objective's pair metrics, on the first `max_sequences` (0:
    all) of `sequences`, computed under `dtype` autocast (None: fp32). `masker` is the
    held-out one, `build_masker(..., for_eval=True)`."""
    cast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    with torch.no_grad(), cast:
        result = mlm_metrics(model, sequences, masker, device, EVAL_BATCH_SIZE, max_sequences)
        result.update(
            objective_metrics(
                model, sequences, masker, objective, device, EVAL_BATCH_SIZE, max_sequences
            )
        )
    if result:
        result["precision"] = "bf16" if dtype is not None else "fp32"
    return result


@torch.no_grad()
def mlm_metrics(
    model: torch.nn.Module,
    sequences: ShardedSequences,
    masker: Masker,
    device: torch.device,
    batch_size: int = 64,
    max_sequences: int = 0,
) -> dict:
    """mlm_loss (nats per masked token), mlm_accuracy and perplexity on held-out data.
    They are computed on the plain held-out sequences whatever the objective, so they
    compare across objectives."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once
    count = 0
    for batch in eval_batches(sequences, masker, batch_size, max_sequences, EVAL_MASK_SEED):
        count += batch.targets.numel()
        batch = batch.to(device)
        logits, _ = model(
            batch.input_ids,
            token_type_ids=batch.token_type_ids,
            attention_mask=batch.attention_mask,
            masked_positions=batch.masked_positions,
            next_sentence=False,
        )
        loss, hits = cross_entropy_and_hits(logits, batch.targets)
        sums[0] += loss
        sums[1] += hits
    if count == 0:
        return {}
    loss_sum, correct = sums.tolist()
    loss = loss_sum / count
    return {
        "mlm_loss": loss,
        "mlm_accuracy": correct / count,
        "perplexity": math.exp(min(loss, 50.0)),
        "masked_tokens": count,
    }


@torch.no_grad()
def pair_metrics(
    model: torch.nn.Module,
    sequences: ShardedSequences,
    masker: Masker,
    kind: str,
    device: torch.device,
    batch_size: int = 64,
    max_sequences: int = 0,
) -> dict:
    """{kind}_loss (nats per pair) and {kind}_accuracy of the 2-way head on held-out pairs.

    kind is 'nsp' or 'sop'. Pairs are built from the first `max_sequences` held-out
    sequences (all if 0), with the same fixed seed; NSP's replacement segments come from
    the whole split.
    """
    paired = PairedMasker(masker, PairBuilder(sequences, masker.special_ids, kind))
    n = len(sequences) if max_sequences == 0 else min(max_sequences, len(sequences))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once
    count = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        batch = paired(sequences.take(idx), idx, EVAL_MASK_SEED, 0)
        count += batch.labelled_pairs
        batch = batch.to(device)
        none = batch.masked_positions[:0]  # only the pair head is scored: skip the MLM decoder
        _, logits = model(
            batch.input_ids,
            token_type_ids=batch.token_type_ids,
            attention_mask=batch.attention_mask,
            masked_positions=none,
        )  # (B, 2)
        labels = batch.next_sentence_label  # (B,); -100 never matches an argmax
        assert labels is not None  # a PairedMasker labels every batch
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[1] += (logits.argmax(-1) == labels).sum()
    if count == 0:
        return {}
    loss_sum, correct = sums.tolist()
    return {
        f"{kind}_loss": loss_sum / count,
        f"{kind}_accuracy": correct / count,
        f"{kind}_pairs": count,
    }


def objective_metrics(
    model: torch.nn.Module,
    sequences: ShardedSequences,
    masker: Masker,
    objective: str,
    device: torch.device,
    batch_size: int = 64,
    max_sequences: int = 0,
) -> dict:
    """The held-out metrics of an objective beyond MLM: pair metrics for mlm+nsp and
    mlm+sop, nothing for mlm."""
    kind = pair_kind(objective)
    if kind is None:
        return {}
    return pair_metrics(model, sequences, masker, kind, device, batch_size, max_sequences)
