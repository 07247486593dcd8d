"""Deterministic, resumable, rank-aware batches from prepared token shards.

The global batch of step t is a pure function of (seed, t): the k-th sequence the run ever
sees is position k mod N of epoch k // N's seeded permutation. Nothing is iterated, so a
resume at any step costs the same, and any split of the global batch into micro-batches
or processes sees the same sequences with the same masks. `ShardedSequences` reads one
data directory or several as one dataset (they must agree on tokenizer, seq_len and
dtype). `verify_data`, called when a run opens data, checks each shard's bytes against
the digest `prepare` recorded and its token ids against the vocabulary.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertforge.data.masking import MaskedBatch, Masker
from bertforge.data.prepare import MANIFEST, SHARD_HASH, load_manifest, open_split
from bertforge.data.tokenizer import load_tokenizer, tokenizer_hash
from bertforge.errors import BertforgeError

if TYPE_CHECKING:
    from bertforge.data.pairs import PairedMasker

DataDirs = str | os.PathLike | Sequence[str | os.PathLike]
# What data directories read together must share (the tokenizer fixes the vocabulary and
# the special ids).
MUST_MATCH = ("tokenizer_hash", "seq_len", "dtype")
_SCAN_BYTES = 4 << 20  # read per step by `verify_data`: its memory is this, whatever the shard


def as_dirs(data_dirs: DataDirs) -> list[Path]:
    """One data directory or several, as a list."""
    if isinstance(data_dirs, (str, os.PathLike)):
        return [Path(data_dirs)]
    return [Path(d) for d in data_dirs]


def load_manifests(data_dirs: DataDirs) -> list[dict[str, Any]]:
    """The manifests of `data_dirs`, refused (naming the field) unless they can be read
    as one dataset."""
    dirs = as_dirs(data_dirs)
    if not dirs:
        raise BertforgeError("no data directory given")
    seen: set[Path] = set()
    for d in dirs:
        if d.resolve() in seen:
            raise BertforgeError(f"data directory given twice: {d}")
        seen.add(d.resolve())
    manifests = [load_manifest(d) for d in dirs]
    for d, m in zip(dirs[1:], manifests[1:]):
        for key in MUST_MATCH:
            if m.get(key) != manifests[0].get(key):
                raise BertforgeError(
                    f"{d} has {key} {m.get(key)!r} but {dirs[0]} has "
                    f"{manifests[0].get(key)!r}; data directories read "
                    f"together must share {', '.join(MUST_MATCH)}"
                )
    return manifests


def verify_data(data_dirs: DataDirs) -> None:
    """Refuse data directories whose shards are not what `prepare` wrote: a shard whose
    SHARD_HASH differs from its manifest's, or that holds a token id outside the vocabulary
    (the manifest's vocab_size, which must be its tokenizer's)."""
    for d in as_dirs(data_dirs):
        manifest = load_manifest(d)
        tok_dir = d / "tokenizer"
        found = tokenizer_hash(tok_dir)
        if manifest["tokenizer_hash"] != found:
            raise BertforgeError(
                f"{tok_dir} is not the tokenizer the manifest names "
                f"(tokenizer_hash); prepare the data again"
            )
        vocab = int(manifest["vocab_size"])
        tokens = load_tokenizer(tok_dir).get_vocab_size(with_added_tokens=True)
        dtype = np.dtype(manifest["dtype"])
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        for split in manifest["splits"]:
            open_split(d, split)  # every shard there, at its size
        for shard in shards:
            path = d / shard["file"]
            top, digest = _scan(path, dtype)
            if top >= min(vocab, tokens):
                raise BertforgeError(
                    f"{path} holds token id {top}, outside the vocabulary "
                    f"(vocab_size {vocab}, tokenizer {tokens} tokens); "
                    f"prepare the data again"
                )
            if digest != shard[SHARD_HASH]:
                raise BertforgeError(
                    f"{path}: {SHARD_HASH} mismatch, the shard changed "
                    f"since it was prepared; prepare the data again"
                )
        if vocab != tokens:
            raise BertforgeError(
                f"{d / MANIFEST}: vocab_size {vocab} is not its tokenizer's "
                f"({tokens} tokens); prepare the data again"
            )


def _scan(path: Path, dtype: np.dtype) -> tuple[int, str]:
    """(largest token id, or -1 if none; SHARD_HASH hex digest) of a shard, in one pass
    that reads _SCAN_BYTES at a time into one buffer."""
    h = hashlib.new(SHARD_HASH)
    buf = bytearray(_SCAN_BYTES)
    top = -1
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            ids = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
            top = max(top, int(ids.max()))
            h.update(memoryview(buf)[:n])
    return top, h.hexdigest()


class ShardedSequences:
    """The sequences of one split across shards (of one or several data directories),
    indexable as one array (N, T).

    Pickled (into a DataLoader worker started by spawn or forkserver, Python 3.14's
    default) it carries the paths, not the shards' bytes: the memmaps are reopened on
    unpickling, where a pickled np.memmap would be a copy of the whole shard."""

    def __init__(self, data_dirs: DataDirs, split: str):
        self.data_dirs = as_dirs(data_dirs)
        self.split = split
        self.manifests = load_manifests(self.data_dirs)
        self.manifest = self.manifests[0]  # what they share: vocabulary, specials, seq_len
        self.shards = self._open()
        self.seq_len = int(self.manifest["seq_len"])
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()

    def _open(self) -> list[np.memmap]:
        return [m for d in self.data_dirs for m in open_split(d, self.split)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "shards": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.shards = self._open()
        if [len(s) for s in self.shards] != np.diff(self.offsets).tolist():
            raise BertforgeError(
                f"{self.data_dirs[0]}: the shards changed while the run was reading them"
            )

    def __len__(self) -> int:
        return self.offsets[-1]

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (B,) as one (B, T) array, in that order."""
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        for row, i in enumerate(index.tolist()):
            shard = bisect.bisect_right(self.offsets, i) - 1
            out[row] = self.shards[shard][i - self.offsets[shard]]
        return out


@functools.lru_cache(maxsize=2)  # a step's batch spans at most two epochs
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n sequences (shared: not to be written)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PretrainBatches:
    """Masked micro-batches of the global batch at each step, for one rank."""

    def __init__(
        self,
        sequences: ShardedSequences,
        masker: Masker | PairedMasker,
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(sequences) == 0:
            raise BertforgeError("the training split has no sequences")
        if batch_size % world_size:
            raise BertforgeError(
                f"batch size {batch_size} is not divisible by the number of processes {world_size}"
            )
        self.sequences, self.masker = sequences, masker
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, len(self.sequences))

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
        index = index[self.rank * share : (self.rank + 1) * share]
        epochs = epochs[self.rank * share : (self.rank + 1) * share]
        for start in range(0, share, self.micro_batch_size):
            idx = index[start : start + self.micro_batch_size]
            ep = epochs[start : start + self.micro_batch_size]
            yield self.masker(self.sequences.take(idx), idx, self.seed, ep)


def eval_batches(
    sequences: ShardedSequences, masker: Masker, batch_size: int, max_sequences: int, seed: int
) -> Iterator[MaskedBatch]:
    """The first `max_sequences` held-out sequences (all if 0), masked with a fixed seed."""
    n = len(sequences) if max_sequences == 0 else min(max_sequences, len(sequences))
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        yield masker(sequences.take(idx), idx, seed, 0)
