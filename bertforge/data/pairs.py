"""Sentence pairs for next-sentence (BERT) and sentence-order (ALBERT) prediction.

Pairs are built at load time from the prepared sequences, so one data directory serves
every objective; `PairBuilder` describes how, and `PairedMasker` masks the pair after.
Every random choice is a hash, like the MLM masks: a sequence pairs the same way in any
micro-batch, process or resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from bertforge.data.masking import GOLDEN_GAMMA, MaskedBatch, splitmix64

IGNORE = -100  # label of a sequence that could not be made into a pair
_CANDIDATES = 4  # NSP: sequences tried for a segment long enough to replace B
_DRAWS = 2 + 2 * _CANDIDATES  # per sequence: coin, cut, then (sequence, offset) per candidate
_KINDS = {"mlm+nsp": "nsp", "mlm+sop": "sop"}
_STREAM = 0x5041_4952  # "PAIR": keeps these draws apart from the masks' hash


def pair_kind(objective: str) -> str | None:
    """'nsp' or 'sop' for an objective that trains on pairs; None for plain 'mlm'."""
    return _KINDS.get(objective)


def pair_uniforms(seed: int, epoch: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """(B, n) uniform [0, 1) floats: row b depends only on (seed, epoch[b], index[b])."""
    key = splitmix64(
        np.array([_STREAM], dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64))
    )
    x = splitmix64(key + epoch.astype(np.uint64) * GOLDEN_GAMMA)  # (B,)
    x = splitmix64(x ^ splitmix64(index.astype(np.uint64) + GOLDEN_GAMMA))  # (B,)
    steps = np.arange(1, n + 1, dtype=np.uint64)[None, :] * GOLDEN_GAMMA  # (1, n)
    x = splitmix64(x[:, None] + steps)  # (B, n)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Sequences(Protocol):
    """What pairs are drawn from: `ShardedSequences` or any (N, T) array-like."""

    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> np.ndarray: ...


@dataclass
class Pairs:
    tokens: np.ndarray  # (B, T) int64: [CLS] A [SEP] B [SEP] [PAD]...
    token_type_ids: np.ndarray  # (B, T) int64: 0 for [CLS] A [SEP] and padding, 1 for B [SEP]
    labels: np.ndarray  # (B,) int64: 0 IsNext / in order, 1 NotNext / swapped, -100 no pair


class PairBuilder:
    """Turns rows of prepared sequences into NSP or SOP pairs.

    A prepared sequence is ``[CLS] body [SEP]`` (then [PAD] in a split's
    last sequence, or after each document with ``document_boundary: new``); an inner [SEP]
    in the body marks a document boundary. For sequence i:

    - its document pieces are the runs of ordinary tokens between special tokens ([CLS],
      [SEP], [PAD]); the longest (the first of equals) is taken, cut to the seq_len - 3
      tokens a pair has room for: L tokens;
    - a cut point c, uniform in [1, L - 1], splits that piece into A (before) and B (after):
      contiguous text of one document, label 0 ("B follows A", as in transformers). Cuts
      fall at any token, not at sentence ends: prepared data keeps no sentence boundaries;
    - NSP: with probability 0.5, B is replaced by a segment of the same length from another
      sequence j (label 1): a window at a random offset in j's longest piece. j is uniform
      over the sequences other than i and, when there are more than three, its immediate
      neighbours, which share i's document whenever that document crosses a sequence
      boundary. That B comes from another document is therefore likely, not certain: a
      document spanning more than three sequences is drawn again with probability about
      (its length in sequences) / N. Up to four candidates j are tried for a piece long
      enough; if none has one, B is the longest of theirs, shorter than the true B;
    - SOP: with probability 0.5, A and B are swapped (label 1);
    - a sequence whose longest piece has fewer than 2 tokens cannot be split: it becomes
      ``[CLS] piece [SEP]`` with label -100, which the loss and its count ignore.

    The result is ``[CLS] A [SEP] B [SEP]`` padded with [PAD] to seq_len, with token type
    0 for [CLS] A [SEP] and 1 for B [SEP] (0 on padding). Every random choice is a hash of
    (seed, epoch, sequence index, draw number) under a stream of its own, like the MLM masks,
    so a sequence pairs the same way in any micro-batch, process or resume. Everything is
    vectorised over the batch in numpy.
    """

    def __init__(self, sequences: Sequences, special_ids: dict[str, int], kind: str):
        if kind not in ("nsp", "sop"):
            raise ValueError(f"pair kind must be 'nsp' or 'sop', not {kind!r}")
        self.sequences, self.kind = sequences, kind
        self.cls, self.sep, self.pad = (special_ids[k] for k in ("cls", "sep", "pad"))

    def longest_piece(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length), each (B,): the longest run of ordinary tokens in each row."""
        t = rows.shape[1]
        ordinary = (rows != self.cls) & (rows != self.sep) & (rows != self.pad)  # (B, T)
        pos = np.arange(t)
        last_special = np.maximum.accumulate(np.where(ordinary, -1, pos), axis=1)  # (B, T)
        run = np.where(ordinary, pos - last_special, 0)  # length of the run ending at t
        end = run.argmax(1)  # the first longest run's last token
        length = run[np.arange(len(rows)), end]
        return end - length + 1, length

    def _others(self, index: np.ndarray, u: np.ndarray) -> np.ndarray:
        """(M,) sequence indices other than `index` (and its neighbours when there are
        enough sequences), uniform given `u` (M,)."""
        n = len(self.sequences)
        if n == 1:
            return index.copy()  # nothing else to draw from; only tiny data gets here
        skip = 1 if n > 3 else 0  # neighbours on each side
        return (index + skip + 1 + (u * (n - 2 * skip - 1)).astype(np.int64)) % n

    def __call__(
        self, tokens: np.ndarray, index: np.ndarray, seed: int, epoch: np.ndarray | int
    ) -> Pairs:
        """tokens (B, T) rows of the sequences `index` (B,); epoch (B,) or a scalar."""
        tokens = np.asarray(tokens, dtype=np.int64)
        index = np.asarray(index, dtype=np.int64)
        b, t = tokens.shape
        epochs = np.broadcast_to(np.asarray(epoch, dtype=np.int64), (b,))
        u = pair_uniforms(seed, epochs, index, _DRAWS)  # (B, _DRAWS)
        start, length = self.longest_piece(tokens)
        length = np.minimum(length, t - 3)  # room for [CLS] A [SEP] B [SEP]
        start = start + np.arange(b) * t  # flat, into `source` below
        splittable = length >= 2
        cut = np.where(splittable, 1 + (u[:, 1] * (length - 1)).astype(np.int64), length)
        flip = splittable & (u[:, 0] < 0.5)  # label 1: NSP replaces B, SOP swaps A and B
        labels = np.where(splittable, flip.astype(np.int64), IGNORE)

        # A and B as flat spans (start, length) of `source`: the rows, then any rows NSP
        # reads replacement segments from.
        source = [tokens.reshape(-1)]
        a_start, a_len = start, cut
        b_start, b_len = start + cut, length - cut
        if self.kind == "sop":
            a_start, a_len, b_start, b_len = (
                np.where(flip, b_start, a_start),
                np.where(flip, b_len, a_len),
                np.where(flip, a_start, b_start),
                np.where(flip, a_len, b_len),
            )
        elif flip.any():
            self._replace(np.flatnonzero(flip), index, u, b_start, b_len, source)
            labels[flip & (b_len == 0)] = IGNORE  # no candidate had any text: no pair
        return self._assemble(np.concatenate(source), t, a_start, a_len, b_start, b_len, labels)

    def _replace(
        self,
        rows: np.ndarray,
        index: np.ndarray,
        u: np.ndarray,
        b_start: np.ndarray,
        b_len: np.ndarray,
        source: list[np.ndarray],
    ) -> None:
        """NSP: point B of `rows` at another sequence's text, appended to `source`
        (b_start and b_len are updated in place). A row's candidate k is read only if
        candidates 0..k-1 had no piece as long as its B."""
        want = b_len[rows]  # (M,)
        best_start, best_len = np.zeros_like(want), np.zeros_like(want)
        base = sum(len(s) for s in source)
        todo = np.arange(len(rows))  # positions in `rows` still looking
        for k in range(_CANDIDATES):
            if len(todo) == 0:
                break
            r = rows[todo]
            cand = self.sequences.take(self._others(index[r], u[r, 2 + 2 * k]))  # (m, T)
            cand = np.asarray(cand, dtype=np.int64)
            c_start, c_len = self.longest_piece(cand)
            c_start = c_start + base + np.arange(len(todo)) * cand.shape[1]
            source.append(cand.reshape(-1))
            base += cand.size
            ok = c_len >= want[todo]
            offset = (u[r, 3 + 2 * k] * (c_len - want[todo] + 1)).astype(np.int64)
            b_start[r[ok]] = (c_start + offset)[ok]
            better = ~ok & (c_len > best_len[todo])
            best_start[todo[better]], best_len[todo[better]] = c_start[better], c_len[better]
            todo = todo[~ok]
        b_start[rows[todo]], b_len[rows[todo]] = best_start[todo], best_len[todo]

    def _assemble(
        self,
        source: np.ndarray,
        t: int,
        a_start: np.ndarray,
        a_len: np.ndarray,
        b_start: np.ndarray,
        b_len: np.ndarray,
        labels: np.ndarray,
    ) -> Pairs:
        """[CLS] A [SEP] B [SEP] [PAD]... from spans of `source`; a row without a pair
        (label -100) is [CLS] A [SEP], B dropped."""
        n = len(labels)
        b_len = np.where(labels == IGNORE, 0, b_len)
        p = np.arange(t)[None, :]  # (1, T)
        la, lb = a_len[:, None], b_len[:, None]  # (B, 1)
        in_a = (p >= 1) & (p <= la)  # (B, T)
        in_b = (p >= la + 2) & (p < la + 2 + lb)
        src = np.where(
            in_a, a_start[:, None] + p - 1, np.where(in_b, b_start[:, None] + p - la - 2, 0)
        )
        out = np.where(in_a | in_b, source[src], self.pad)
        r = np.arange(n)
        has_b = b_len > 0
        out[:, 0] = self.cls
        out[r, a_len + 1] = self.sep
        out[r[has_b], (a_len + b_len + 2)[has_b]] = self.sep
        types = ((p >= la + 2) & (p <= la + lb + 2) & has_b[:, None]).astype(np.int64)
        return Pairs(out, types, labels)


class PairedMasker:
    """Builds pairs, then masks them: takes the place of a Masker in `PretrainBatches`.

    MLM masking never selects [CLS], [SEP] or [PAD], so the pair structure survives it.
    """

    def __init__(self, masker, pairs: PairBuilder):
        self.masker, self.pairs = masker, pairs

    def __call__(
        self, tokens: np.ndarray, index: np.ndarray, seed: int, epoch: np.ndarray | int
    ) -> MaskedBatch:
        p = self.pairs(tokens, index, seed, epoch)
        batch = self.masker(p.tokens, index, seed, epoch)
        batch.token_type_ids = torch.from_numpy(p.token_type_ids)
        batch.next_sentence_label = torch.from_numpy(p.labels)
        return batch
