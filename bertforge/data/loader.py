"""Deterministic, resumable, rank-aware batches from prepared token shards.

The global batch of step t is a pure function of (seed, t): the k-th sequence the
run ever sees is position k mod N of epoch k // N's seeded permutation. Nothing is
iterated, so resuming at step 10,000 costs the same as at step 10 (one permutation
of the current epoch), and any split of the global batch into micro-batches or
processes sees the same sequences with the same masks.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bertforge.data.masking import MaskedBatch, Masker
from bertforge.data.prepare import load_manifest, open_split
from bertforge.errors import BertforgeError


class ShardedSequences:
    """The sequences of one split across shards, indexable as one array (N, T)."""

    def __init__(self, data_dir: Path, split: str):
        self.manifest = load_manifest(data_dir)
        self.shards = open_split(data_dir, split)
        self.seq_len = int(self.manifest["seq_len"])
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (B,) as one (B, T) array, in that order."""
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        for row, i in enumerate(index.tolist()):
            shard = bisect.bisect_right(self.offsets, i) - 1
            out[row] = self.shards[shard][i - self.offsets[shard]]
        return out


class PretrainBatches:
    """Masked micro-batches of the global batch at each step, for one rank."""

    def __init__(self, sequences: ShardedSequences, masker: Masker, batch_size: int,
                 micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(sequences) == 0:
            raise BertforgeError("the training split has no sequences")
        if batch_size % world_size:
            raise BertforgeError(f"batch size {batch_size} is not divisible by the "
                                 f"number of processes {world_size}")
        self.sequences, self.masker = sequences, masker
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.sequences))

    def global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(sequence indices, epochs) of the global batch at `step`, shapes (B,)."""
        n = len(self.sequences)
        k = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, pos = k // n, k % n
        index = np.empty_like(k)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            index[sel] = self._permutation(epoch)[pos[sel]]
        return index, epochs

    def epoch_at(self, step: int) -> float:
        return step * self.batch_size / len(self.sequences)

    def micro_batches(self, step: int) -> Iterator[MaskedBatch]:
        """This rank's share of the global batch, split into micro-batches."""
        index, epochs = self.global_indices(step)
        share = self.batch_size // self.world_size
        index = index[self.rank * share:(self.rank + 1) * share]
        epochs = epochs[self.rank * share:(self.rank + 1) * share]
        for start in range(0, share, self.micro_batch_size):
            idx = index[start:start + self.micro_batch_size]
            ep = epochs[start:start + self.micro_batch_size]
            yield self.masker(self.sequences.take(idx), idx, self.seed, ep)


def eval_batches(sequences: ShardedSequences, masker: Masker, batch_size: int,
                 max_sequences: int, seed: int) -> Iterator[MaskedBatch]:
    """The first `max_sequences` held-out sequences (all if 0), masked with a fixed seed."""
    n = len(sequences) if max_sequences == 0 else min(max_sequences, len(sequences))
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        yield masker(sequences.take(idx), idx, seed, 0)
