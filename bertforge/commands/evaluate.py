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

Training's periodic evaluation and `bertforge evaluate` both go through
`heldout_metrics`: the same sequences, batches and precision (the run's, bf16 where it
trained in bf16), so the held-out loss a run logs is the one `evaluate` prints for that
checkpoint; both record the precision they used.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.data.loader import ShardedSequences, eval_batches, verify_data
from bertforge.data.masking import Masker
from bertforge.data.pairs import PairBuilder, PairedMasker, pair_kind
from bertforge.model.ops import cross_entropy_and_hits
from bertforge.train.runtime import autocast

EVAL_MASK_SEED = 20181011  # the day BERT appeared on arXiv
EVAL_BATCH_SIZE = 64  # sequences per forward pass, in training's evaluation and `evaluate`


def heldout_metrics(model: torch.nn.Module, sequences: ShardedSequences, masker: Masker,
                    objective: str, device: torch.device, dtype: torch.dtype | None,
                    max_sequences: int = 0) -> dict:
    """MLM metrics, and the objective's pair metrics, on the first `max_sequences` (0:
    all) of `sequences`, computed under `dtype` autocast (None: fp32)."""
    with torch.no_grad(), autocast(device, dtype):
        result = mlm_metrics(model, sequences, masker, device, EVAL_BATCH_SIZE, max_sequences)
        result.update(objective_metrics(model, sequences, masker, objective, device,
                                        EVAL_BATCH_SIZE, max_sequences))
    if result:
        result["precision"] = "bf16" if dtype is not None else "fp32"
    return result


@torch.no_grad()
def mlm_metrics(model: torch.nn.Module, sequences: ShardedSequences, masker: Masker,
                device: torch.device, batch_size: int = 64, max_sequences: int = 0) -> dict:
    """mlm_loss (nats per masked token), mlm_accuracy and perplexity on held-out data."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once
    count = 0
    for batch in eval_batches(sequences, masker, batch_size, max_sequences, EVAL_MASK_SEED):
        count += batch.targets.numel()
        batch = batch.to(device)
        logits, _ = model(batch.input_ids, token_type_ids=batch.token_type_ids,
                          attention_mask=batch.attention_mask,
                          masked_positions=batch.masked_positions, next_sentence=False)
        loss, hits = cross_entropy_and_hits(logits, batch.targets)
        sums[0] += loss
        sums[1] += hits
    if count == 0:
        return {}
    loss_sum, correct = sums.tolist()
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
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once
    count = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        batch = paired(sequences.take(idx), idx, EVAL_MASK_SEED, 0)
        count += int((batch.next_sentence_label >= 0).sum())  # -100: no pair could be made
        batch = batch.to(device)
        none = batch.masked_positions[:0]  # only the pair head is scored: skip the MLM decoder
        _, logits = model(batch.input_ids, token_type_ids=batch.token_type_ids,
                          attention_mask=batch.attention_mask, masked_positions=none)  # (B, 2)
        labels = batch.next_sentence_label  # (B,); -100 never matches an argmax
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[1] += (logits.argmax(-1) == labels).sum()
    if count == 0:
        return {}
    loss_sum, correct = sums.tolist()
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


def evaluate_run(run_dir: Path, data: list[Path] | None = None, split: str = "valid",
                 checkpoint: Path | None = None, max_sequences: int | None = None,
                 device: str = "auto", precision: str | None = None) -> dict:
    """What `bertforge evaluate` prints: held-out metrics of a run's newest good checkpoint
    (or `checkpoint`) on its data (or `data`), with the unigram baseline on the same masked
    tokens. max_sequences and precision default to the run's own (train.eval_sequences
    and train.precision), so the figures equal the run's logged evaluation."""
    from bertforge import rundir
    from bertforge.data.masking import build_masker
    from bertforge.errors import BertforgeError
    from bertforge.train.runtime import configure, resolve_device, resolve_precision

    model, cfg, _ = rundir.load_run_model(Path(run_dir), checkpoint)
    # One data directory or several (--data DIR --data DIR, or the run's list).
    valid = ShardedSequences(data or cfg.data.path or Path(run_dir) / rundir.DATA, split)
    verify_data(valid.data_dirs)  # changed shards, or ids outside the vocabulary: refused
    data_dir = valid.data_dirs[0]  # they share the tokenizer the masker reads
    manifest = valid.manifest
    if int(manifest["vocab_size"]) != cfg.model.vocab_size:
        raise BertforgeError(f"{data_dir} was built with a different tokenizer "
                             f"(vocab {manifest['vocab_size']} vs {cfg.model.vocab_size})")
    if len(valid) == 0:
        raise BertforgeError(f"{data_dir} has no {split} sequences to evaluate on")
    # Token masking at the run's rate whatever the run trained with: one held-out task.
    masker = build_masker(cfg.data, data_dir, manifest, for_eval=True)
    target = resolve_device(device)
    configure(target)
    dtype = resolve_precision(precision or cfg.train.precision, target)
    limit = cfg.train.eval_sequences if max_sequences is None else max_sequences
    result = heldout_metrics(model.to(target), valid, masker, cfg.data.objective, target,
                             dtype, limit)
    train = ShardedSequences(valid.data_dirs, "train")
    result["unigram_baseline_loss"] = unigram_baseline(train, valid, masker, limit)
    result["split"] = split
    return result
