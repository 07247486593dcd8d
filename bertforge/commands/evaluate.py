"""`bertforge evaluate`: held-out metrics of a run's checkpoint, and the unigram baseline.

The metrics are `tasks.mlm.heldout_metrics`, the ones training logs, on the same masked
tokens and in the same precision, so the figures `evaluate` prints for a checkpoint equal
the run's logged evaluation. The unigram baseline scores those masked tokens from
training-set token frequencies alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertforge.data.loader import ShardedSequences, eval_batches, verify_data
from bertforge.data.masking import Masker
from bertforge.tasks.mlm import EVAL_MASK_SEED, heldout_metrics

__all__ = ["EVAL_MASK_SEED", "evaluate_run", "unigram_baseline"]


def unigram_baseline(
    train: ShardedSequences,
    valid: ShardedSequences,
    masker: Masker,
    max_sequences: int = 0,
    max_train_sequences: int = 400_000,
) -> float:
    """Loss of predicting every masked token from training-set token frequencies alone.

    A model whose held-out MLM loss is not well below this has learned nothing beyond
    word frequencies. Add-one smoothing keeps unseen tokens finite.
    """
    counts = np.zeros(masker.vocab_size, dtype=np.float64)
    n = min(len(train), max_train_sequences)
    for start in range(0, n, 4096):
        rows = train.take(np.arange(start, min(start + 4096, n), dtype=np.int64))
        counts += np.bincount(rows.reshape(-1), minlength=masker.vocab_size)[: masker.vocab_size]
    for name in ("pad", "cls", "sep", "mask"):  # never prediction targets
        counts[masker.special_ids[name]] = 0
    logp = np.log((counts + 1) / (counts + 1).sum())
    total, count = 0.0, 0
    for batch in eval_batches(valid, masker, 256, max_sequences, EVAL_MASK_SEED):
        total -= logp[batch.targets.numpy()].sum()
        count += batch.targets.numel()
    return total / max(count, 1)


def evaluate_run(
    run_dir: Path,
    data: list[Path] | None = None,
    split: str = "valid",
    checkpoint: Path | None = None,
    max_sequences: int | None = None,
    device: str = "auto",
    precision: str | None = None,
) -> dict:
    """What `bertforge evaluate` prints: held-out metrics of a run's newest good checkpoint
    (or `checkpoint`) on its data (or `data`), with the unigram baseline on the same masked
    tokens. max_sequences and precision default to the run's own (train.eval_sequences
    and train.precision), so the figures equal the run's logged evaluation."""
    from bertforge import rundir
    from bertforge.commands.loading import load_run_model
    from bertforge.data.masking import build_masker
    from bertforge.errors import BertforgeError
    from bertforge.train.runtime import configure, resolve_device, resolve_precision

    model, cfg, _ = load_run_model(Path(run_dir), checkpoint)
    # One data directory or several (--data DIR --data DIR, or the run's list).
    valid = ShardedSequences(data or cfg.data.path or Path(run_dir) / rundir.DATA, split)
    verify_data(valid.data_dirs)  # changed shards, or ids outside the vocabulary: refused
    data_dir = valid.data_dirs[0]  # they share the tokenizer the masker reads
    manifest = valid.manifest
    if int(manifest["vocab_size"]) != cfg.model.vocab_size:
        raise BertforgeError(
            f"{data_dir} was built with a different tokenizer "
            f"(vocab {manifest['vocab_size']} vs {cfg.model.vocab_size})"
        )
    if len(valid) == 0:
        raise BertforgeError(f"{data_dir} has no {split} sequences to evaluate on")
    # Token masking at the run's rate whatever the run trained with: one held-out task.
    masker = build_masker(cfg.data, data_dir, manifest, for_eval=True)
    target = resolve_device(device)
    configure(target)
    dtype = resolve_precision(precision or cfg.train.precision, target)
    limit = cfg.train.eval_sequences if max_sequences is None else max_sequences
    result = heldout_metrics(
        model.to(target), valid, masker, cfg.data.objective, target, dtype, limit
    )
    train = ShardedSequences(valid.data_dirs, "train")
    result["unigram_baseline_loss"] = unigram_baseline(train, valid, masker, limit)
    result["split"] = split
    return result
