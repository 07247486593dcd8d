"""Held-out masked-LM metrics, and the unigram-frequency baseline to read them against.

Evaluation masks the held-out sequences with a fixed seed (EVAL_MASK_SEED) that does not
depend on the training seed, so any two checkpoints, or two calls on one checkpoint, are
scored on exactly the same masked tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bertforge.data.loader import ShardedSequences, eval_batches
from bertforge.data.masking import Masker
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
