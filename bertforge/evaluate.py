"""Held-out masked-LM and sentence-pair metrics, and the unigram baseline for MLM.

Evaluation masks the held-out sequences with a fixed seed (EVAL_MASK_SEED) that does not
depend on the training seed, so any two checkpoints, or two calls on one checkpoint, are
scored on exactly the same masked tokens. The masker passed in is the held-out one,
`build_masker(..., for_eval=True)`: token masking at the run's rate even for runs that
trained with whole-word or span masking, so runs of every variant face the same task.

MLM metrics are always computed on the plain held-out sequences, whatever the objective,
so they too compare across objectives. A run trained with NSP or SOP is also scored on
held-out pairs (`pair_metrics`), built from the same sequences with the same fixed seed
and masked like the held-out MLM sequences.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.data.loader import ShardedSequences, eval_batches
from bertforge.data.masking import Masker
from bertforge.data.pairs import PairBuilder, PairedMasker, pair_kind
from bertforge.losses import cross_entropy_sum

EVAL_MASK_SEED = 20181011  # the day BERT appeared on arXiv


@torch.no_grad()
def mlm_metrics(model: torch.nn.Module, sequences: ShardedSequences, masker: Masker,
                device: torch.device, batch_size: int = 64, max_sequences: int = 0) -> dict:
    """mlm_loss (nats per masked token), mlm_accuracy and perplexity on held-out data."""
    loss_sum, correct, count = 0.0, 0, 0
    for batch in eval_batches(sequences, masker, batch_size, max_sequences, EVAL_MASK_SEED):
        batch = batch.to(device)
        logits, _ = model(batch.input_ids, token_type_ids=batch.token_type_ids,
                          attention_mask=batch.attention_mask,
                          masked_positions=batch.masked_positions)
        loss_sum += cross_entropy_sum(logits, batch.targets).item()
        correct += (logits.argmax(-1) == batch.targets).sum().item()
        count += batch.targets.numel()
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"mlm_loss": loss, "mlm_accuracy": correct / count,
            "perplexity": math.exp(min(loss, 50.0)), "masked_tokens": count}


@torch.no_grad()
def pair_metrics(model: torch.nn.Module, sequences: ShardedSequences, masker: Masker,
                 kind: str, device: torch.device, batch_size: int = 64,
                 max_sequences: int = 0) -> dict:
    """{kind}_loss (nats per pair) and {kind}_accuracy of the 2-way head on held-out pairs.

    kind is 'nsp' or 'sop'. Pairs are built from the first `max_sequences` held-out
    sequences (all if 0); NSP's replacement segments come from the whole split.
    """
    paired = PairedMasker(masker, PairBuilder(sequences, masker.special_ids, kind))
    n = len(sequences) if max_sequences == 0 else min(max_sequences, len(sequences))
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        batch = paired(sequences.take(idx), idx, EVAL_MASK_SEED, 0).to(device)
        none = batch.masked_positions[:0]  # only the pair head is scored: skip the MLM decoder
        _, logits = model(batch.input_ids, token_type_ids=batch.token_type_ids,
                          attention_mask=batch.attention_mask, masked_positions=none)  # (B, 2)
        labels = batch.next_sentence_label  # (B,), -100 where no pair could be made
        kept = labels >= 0
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1)[kept] == labels[kept]).sum().item()
        count += int(kept.sum().item())
    if count == 0:
        return {}
    return {f"{kind}_loss": loss_sum / count, f"{kind}_accuracy": correct / count,
            f"{kind}_pairs": count}


def objective_metrics(model: torch.nn.Module, sequences: ShardedSequences, masker: Masker,
                      objective: str, device: torch.device, batch_size: int = 64,
                      max_sequences: int = 0) -> dict:
    """The held-out metrics of an objective beyond MLM: pair metrics for mlm+nsp and
    mlm+sop, nothing for mlm."""
    kind = pair_kind(objective)
    if kind is None:
        return {}
    return pair_metrics(model, sequences, masker, kind, device, batch_size, max_sequences)


def unigram_baseline(train: ShardedSequences, valid: ShardedSequences, masker: Masker,
                     max_sequences: int = 0, max_train_sequences: int = 400_000) -> float:
    """Loss of predicting every masked token from training-set token frequencies alone.

    A model whose held-out MLM loss is not well below this has learned nothing beyond
    word frequencies. Add-one smoothing keeps unseen tokens finite.
    """
    counts = np.zeros(masker.vocab_size, dtype=np.float64)
    n = min(len(train), max_train_sequences)
    for start in range(0, n, 4096):
        rows = train.take(np.arange(start, min(start + 4096, n), dtype=np.int64))
        counts += np.bincount(rows.reshape(-1), minlength=masker.vocab_size)[:masker.vocab_size]
    for name in ("pad", "cls", "sep", "mask"):  # never prediction targets
        counts[masker.special_ids[name]] = 0
    logp = np.log((counts + 1) / (counts + 1).sum())
    total, count = 0.0, 0
    for batch in eval_batches(valid, masker, 256, max_sequences, EVAL_MASK_SEED):
        total -= logp[batch.targets.numpy()].sum()
        count += batch.targets.numel()
    return total / max(count, 1)
