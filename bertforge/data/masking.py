"""Dynamic MLM masking, seeded per sequence: BERT tokens, whole words, SpanBERT spans.

Every random number is a hash of (seed, epoch, sequence index, position, stream), a
counter-based generator vectorised over the (B, T) batch in numpy: a sequence is masked
the same way whatever micro-batch, process or resume it lands in, which makes losses
independent of the micro-batch size and resumes exact (docs/architecture.md). `Masker`
describes the variants.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from bertforge.errors import BertforgeError

if TYPE_CHECKING:
    from bertforge.config import DataConfig

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM_SELECT, _STREAM_ACTION, _STREAM_TOKEN = 1, 2, 3
_STREAM_SPAN_START, _STREAM_SPAN_LENGTH, _STREAM_SPAN_BUDGET = 4, 5, 6  # streams < 16


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_uniform(
    seed: int, epoch: np.ndarray | int, index: np.ndarray, seq_len: int, stream: int
) -> np.ndarray:
    """Uniform [0, 1) floats of shape (B, seq_len), one per (epoch, sequence index, position).

    epoch and index are (B,) arrays (epoch may be a scalar).
    """
    epoch = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
    key = splitmix64(
        (np.uint64(seed) << np.uint64(20)) ^ (epoch << np.uint64(4)) ^ np.uint64(stream)
    )
    pos = np.arange(seq_len, dtype=np.uint64)
    x = (
        splitmix64(index.astype(np.uint64) * GOLDEN_GAMMA ^ key)[:, None]
        + pos[None, :] * GOLDEN_GAMMA
    )
    return (splitmix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def span_lengths(u: np.ndarray, p: float, max_len: int) -> np.ndarray:
    """Geometric(p) lengths truncated to 1..max_len (renormalised, as SpanBERT), from
    uniforms `u` by the inverse CDF F(l) = (1 - q**l) / (1 - q**max_len), q = 1 - p."""
    if p >= 1.0:
        return np.ones(u.shape, dtype=np.int64)
    q = 1.0 - p
    x = np.log1p(-u * (1.0 - q**max_len)) / np.log(q)
    return np.clip(1 + np.floor(x).astype(np.int64), 1, max_len)


@dataclass
class MaskedBatch:
    """One micro-batch ready for the model."""

    input_ids: torch.Tensor  # (B, T) int64, with masks applied
    masked_positions: torch.Tensor  # (N,) int64 flat indices into B*T
    targets: torch.Tensor  # (N,) int64 original token ids at those positions
    attention_mask: torch.Tensor | None  # (B, T) 1 = token, 0 = padding; None when unpadded
    token_type_ids: torch.Tensor | None = None  # (B, T)
    # (B,) int64 for NSP/SOP: 0 = B follows A, 1 = it does not; -100 = no pair (ignored)
    next_sentence_label: torch.Tensor | None = None

    # What changes from batch to batch, for torch.compile (bertforge.train.compiling): the
    # number of masked tokens. (B, T) stay; an epoch's padded last batch is a graph apart.
    DYNAMIC_DIMS: ClassVar[dict[str, tuple[int, ...]]] = {"masked_positions": (0,), "targets": (0,)}

    @property
    def real_tokens(self) -> int:
        """Input tokens that are not padding (host-side batches only)."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    @property
    def labelled_pairs(self) -> int:
        """Sequences with an NSP/SOP label (-100: no pair could be made), host-side batches
        only; 0 without pairs."""
        if self.next_sentence_label is None:
            return 0
        return int((self.next_sentence_label >= 0).sum())

    def _map(self, f: Any) -> MaskedBatch:
        return MaskedBatch(
            f(self.input_ids),
            f(self.masked_positions),
            f(self.targets),
            *(
                None if t is None else f(t)
                for t in (self.attention_mask, self.token_type_ids, self.next_sentence_label)
            ),
        )

    def to(self, device: torch.device) -> MaskedBatch:
        """On `device`; the copy does not block when the batch is in pinned memory."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> MaskedBatch:
        return self._map(torch.Tensor.pin_memory)


@dataclass
class Masker:
    """Applies MLM masking to batches, in one of three ways (`DataConfig.masking`); all
    three then apply the 80/10/10 rule ([MASK] / random token / unchanged, ratios
    configurable) once per *unit*, so the pieces of a unit are all [MASK], all random or
    all unchanged:

    - ``token`` (BERT): each maskable token is selected with probability mask_rate; the
      unit is the token.
    - ``wwm`` (whole-word masking): a word is a token plus the WordPiece continuations
      (``##`` pieces) that follow it; each word is selected with probability mask_rate,
      decided by the hash at its first piece, and all its pieces are masked together. The
      expected token rate stays mask_rate. The unit is the word: deciding 80/10/10 per
      piece would leave the word's other pieces visible and give away much of what
      whole-word masking hides.
    - ``span`` (SpanBERT, Joshi et al. 2020): span lengths in words are drawn from a
      geometric distribution with p = span_p truncated (renormalised) at span_max words;
      a span starts at a word start chosen uniformly among the words not yet masked and
      covers whole words. Spans are added until the sequence's budget, mask_rate x its
      maskable tokens (stochastically rounded), is reached. The word that reaches the
      budget is still masked whole, so a sequence may overshoot it by less than one word.
      A span also stops early at [SEP], [CLS] or [PAD] (no span crosses a document
      boundary) and at a word another span already holds (spans never overlap), so spans
      come out shorter than drawn. The unit is the span.

    [CLS], [SEP] and [PAD] are never selected. A sequence that starts with continuation
    pieces (packing cut a word) treats them as one word of their own.
    """

    vocab_size: int
    special_ids: dict[str, int]  # pad, unk, cls, sep, mask
    mask_rate: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1
    masking: str = "token"
    span_p: float = 0.2
    span_max: int = 10
    is_continuation: np.ndarray | None = None  # (V,) bool: the id is a "##" piece

    def __post_init__(self) -> None:
        if self.masking not in ("token", "wwm", "span"):
            raise BertforgeError(f"masking {self.masking!r}: must be token, wwm or span")
        if self.masking != "token" and self.is_continuation is None:
            raise BertforgeError(
                f"masking {self.masking!r} needs the tokenizer's "
                f"continuation table (is_continuation)"
            )

    def __call__(
        self, tokens: np.ndarray, index: np.ndarray, seed: int, epoch: np.ndarray | int
    ) -> MaskedBatch:
        """tokens (B, T) ids; index and epoch (B,) (epoch may be a scalar): each row's mask
        depends only on (seed, its epoch, its index)."""
        tokens = tokens.astype(np.int64)
        b, t = tokens.shape
        selected, unit = self.select(tokens, index, seed, epoch)
        flat = np.flatnonzero(selected)  # (N,)
        # 80/10/10 once per unit: every piece reads the draw at its unit's first position.
        action = hash_uniform(seed, epoch, index, t, _STREAM_ACTION).reshape(-1)[unit[flat]]
        to_mask = action < self.mask_token_ratio
        to_random = ~to_mask & (action < self.mask_token_ratio + self.random_token_ratio)
        # Random replacements are drawn per piece from ordinary tokens only, never specials.
        low = max(self.special_ids.values()) + 1
        random_ids = low + (
            hash_uniform(seed, epoch, index, t, _STREAM_TOKEN).reshape(-1)[flat]
            * (self.vocab_size - low)
        ).astype(np.int64)

        targets = tokens.reshape(-1)[flat]
        inputs = tokens.reshape(-1).copy()
        inputs[flat] = np.where(
            to_mask, self.special_ids["mask"], np.where(to_random, random_ids, targets)
        )
        pad = self.special_ids["pad"]
        padded = bool((tokens == pad).any())  # packed sequences have none: keep SDPA mask-free
        return MaskedBatch(
            input_ids=torch.from_numpy(inputs.reshape(b, t)),
            masked_positions=torch.from_numpy(flat),
            targets=torch.from_numpy(targets),
            attention_mask=torch.from_numpy((tokens != pad).astype(np.int64)) if padded else None,
        )

    def select(
        self, tokens: np.ndarray, index: np.ndarray, seed: int, epoch: np.ndarray | int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which positions are predicted, and the unit each belongs to.

        Returns `selected` (B, T) bool and `unit` (B*T,) int64: for a selected position,
        the flat index of the first position of its unit (itself, its word's first piece
        or its span's first piece); -1 elsewhere.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        b, t = tokens.shape
        pad, cls, sep = (self.special_ids[k] for k in ("pad", "cls", "sep"))
        maskable = (tokens != pad) & (tokens != cls) & (tokens != sep)  # (B, T)
        u = hash_uniform(seed, epoch, index, t, _STREAM_SELECT)  # (B, T)
        if self.masking == "token":
            selected = maskable & (u < self.mask_rate)
            unit = np.where(selected.reshape(-1), np.arange(b * t), -1)
            return selected, unit

        # A word starts at every maskable piece that is not a continuation of a maskable
        # piece just before it (in the same row).
        assert self.is_continuation is not None  # checked in __post_init__
        cont = self.is_continuation[tokens] & maskable  # (B, T)
        prev = np.zeros_like(maskable)
        prev[:, 1:] = maskable[:, :-1]
        start = (maskable & ~(cont & prev)).reshape(-1)  # (B*T,)
        starts = np.flatnonzero(start)  # (W,) flat position of each word's first piece
        if len(starts) == 0:
            return np.zeros((b, t), bool), np.full(b * t, -1, np.int64)
        word_of = np.cumsum(start) - 1  # (B*T,) the word a maskable position belongs to
        flat_maskable = maskable.reshape(-1)
        if self.masking == "wwm":
            chosen = u.reshape(-1)[starts] < self.mask_rate  # (W,) decided at the first piece
            word_unit = np.where(chosen, starts, -1)  # (W,)
        else:
            word_unit = self._spans(starts, word_of, flat_maskable, b, t, index, seed, epoch)
        unit = np.where(flat_maskable, word_unit[np.maximum(word_of, 0)], -1)
        return (unit >= 0).reshape(b, t), unit

    def _spans(
        self,
        starts: np.ndarray,
        word_of: np.ndarray,
        flat_maskable: np.ndarray,
        b: int,
        t: int,
        index: np.ndarray,
        seed: int,
        epoch: np.ndarray | int,
    ) -> np.ndarray:
        """SpanBERT's procedure per row; returns (W,) the first position of the span each
        word belongs to, -1 for words left unmasked."""
        lens = np.bincount(word_of[flat_maskable], minlength=len(starts))  # (W,) pieces
        row = starts // t
        # The next word continues a span only if it follows with no special token between.
        follows = np.zeros(len(starts), bool)
        follows[:-1] = (starts[:-1] + lens[:-1] == starts[1:]) & (row[:-1] == row[1:])
        bounds = np.searchsorted(row, np.arange(b + 1)).tolist()  # row r: bounds[r]:bounds[r+1]
        n_maskable = flat_maskable.reshape(b, t).sum(1)
        u_budget = hash_uniform(seed, epoch, index, 1, _STREAM_SPAN_BUDGET)[:, 0]
        budget = np.floor(self.mask_rate * n_maskable + u_budget).astype(np.int64).tolist()
        # At most one span per word, so T draws per row always suffice.
        u_start = hash_uniform(seed, epoch, index, t, _STREAM_SPAN_START).tolist()
        length = span_lengths(
            hash_uniform(seed, epoch, index, t, _STREAM_SPAN_LENGTH), self.span_p, self.span_max
        ).tolist()
        lens_l, follows_l, starts_l = lens.tolist(), follows.tolist(), starts.tolist()
        span_of = [-1] * len(starts)
        for r in range(b):
            free = list(range(bounds[r], bounds[r + 1]))  # sorted words not yet masked
            count, j = 0, 0
            while count < budget[r] and free:
                w = free[int(u_start[r][j] * len(free))]
                want, first, n = length[r][j], starts_l[w], 0
                j += 1
                while True:
                    del free[bisect.bisect_left(free, w)]
                    span_of[w] = first
                    count += lens_l[w]
                    n += 1
                    if n == want or count >= budget[r] or not follows_l[w] or span_of[w + 1] >= 0:
                        break
                    w += 1
        return np.asarray(span_of, dtype=np.int64)


def continuation_table(tokenizer_dir: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """(V,) bool: which ids of the tokenizer in `tokenizer_dir` are "##" continuation pieces."""
    from bertforge.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab(with_added_tokens=True)
    if len(vocab) != vocab_size:
        raise BertforgeError(
            f"{tokenizer_dir}: tokenizer has {len(vocab)} tokens, but the "
            f"data has a vocabulary of {vocab_size}"
        )
    table = np.zeros(vocab_size, dtype=bool)
    table[[i for token, i in vocab.items() if token.startswith("##")]] = True
    return table


def build_masker(
    data_cfg: DataConfig,
    data_dir: str | os.PathLike,
    manifest: dict[str, Any] | None = None,
    for_eval: bool = False,
) -> Masker:
    """The Masker for data prepared in `data_dir`, as `data_cfg` asks (the one place
    where training and evaluation build theirs).

    With `for_eval`, the held-out masker: always ``token`` masking at the run's mask_rate
    and replacement ratios, whatever `data_cfg.masking` is, so that runs trained with
    different masking variants are scored on the same held-out task. wwm and span read
    the continuation pieces from the tokenizer copy in DATA_DIR/tokenizer.
    """
    from bertforge.data.prepare import load_manifest

    if manifest is None:
        manifest = load_manifest(data_dir)
    vocab_size = int(manifest["vocab_size"])
    masking = "token" if for_eval else data_cfg.masking
    table = None
    if masking != "token":
        tok_dir = Path(data_dir) / "tokenizer"
        if not tok_dir.is_dir():
            raise BertforgeError(
                f"masking {masking!r} needs the tokenizer the data was "
                f"prepared with, and {tok_dir} is missing"
            )
        table = continuation_table(tok_dir, vocab_size)
    return Masker(
        vocab_size=vocab_size,
        special_ids=manifest["special_token_ids"],
        mask_rate=data_cfg.mask_rate,
        mask_token_ratio=data_cfg.mask_token_ratio,
        random_token_ratio=data_cfg.random_token_ratio,
        masking=masking,
        span_p=data_cfg.span_p,
        span_max=data_cfg.span_max,
        is_continuation=table,
    )
