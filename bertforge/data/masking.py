"""Dynamic MLM masking (BERT's 80/10/10), seeded per sequence.

Every random number is a hash of (seed, epoch, sequence index, position, stream):
a counter-based generator. A sequence is therefore masked the same way whatever
micro-batch, process or resume it lands in, which is what makes losses independent
of the micro-batch size and resumes exact (DESIGN.md, "Batches are defined by
sequences"). The hash is vectorised over the whole (B, T) batch in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM_SELECT, _STREAM_ACTION, _STREAM_TOKEN = 1, 2, 3


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, epoch: np.ndarray, index: np.ndarray, seq_len: int,
                 stream: int) -> np.ndarray:
    """Uniform [0, 1) floats of shape (B, seq_len), one per (epoch, sequence index, position).

    epoch and index are (B,) arrays (epoch may be a scalar).
    """
    epoch = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
    key = _mix((np.uint64(seed) << np.uint64(20)) ^ (epoch << np.uint64(4)) ^ np.uint64(stream))
    pos = np.arange(seq_len, dtype=np.uint64)
    x = _mix(index.astype(np.uint64) * _GOLDEN ^ key)[:, None] + pos[None, :] * _GOLDEN
    return (_mix(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class MaskedBatch:
    """One micro-batch ready for the model."""

    input_ids: torch.Tensor  # (B, T) int64, with masks applied
    masked_positions: torch.Tensor  # (N,) int64 flat indices into B*T
    targets: torch.Tensor  # (N,) int64 original token ids at those positions
    attention_mask: torch.Tensor | None  # (B, T) 1 = token, 0 = padding; None when unpadded
    token_type_ids: torch.Tensor | None = None  # (B, T)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> MaskedBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return MaskedBatch(move(self.input_ids), move(self.masked_positions), move(self.targets),
                           move(self.attention_mask), move(self.token_type_ids))


@dataclass
class Masker:
    """Applies BERT masking to batches of token sequences."""

    vocab_size: int
    special_ids: dict[str, int]  # pad, unk, cls, sep, mask
    mask_rate: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1

    def __call__(self, tokens: np.ndarray, index: np.ndarray, seed: int,
                 epoch: np.ndarray | int) -> MaskedBatch:
        """tokens (B, T) ids; index and epoch (B,) (epoch may be a scalar): each row's mask
        depends only on (seed, its epoch, its index)."""
        tokens = tokens.astype(np.int64)
        b, t = tokens.shape
        pad, cls, sep = (self.special_ids[k] for k in ("pad", "cls", "sep"))
        maskable = (tokens != pad) & (tokens != cls) & (tokens != sep)
        selected = maskable & (hash_uniform(seed, epoch, index, t, _STREAM_SELECT) < self.mask_rate)

        action = hash_uniform(seed, epoch, index, t, _STREAM_ACTION)
        to_mask = selected & (action < self.mask_token_ratio)
        to_random = selected & ~to_mask & (action < self.mask_token_ratio + self.random_token_ratio)
        # Random replacements are drawn from ordinary tokens only, never specials.
        low = max(self.special_ids.values()) + 1
        random_ids = low + (hash_uniform(seed, epoch, index, t, _STREAM_TOKEN)
                            * (self.vocab_size - low)).astype(np.int64)

        inputs = np.where(to_mask, self.special_ids["mask"], tokens)
        inputs = np.where(to_random, random_ids, inputs)
        flat = np.flatnonzero(selected)
        padded = bool((tokens == pad).any())  # packed sequences have none: keep SDPA mask-free
        return MaskedBatch(
            input_ids=torch.from_numpy(inputs),
            masked_positions=torch.from_numpy(flat),
            targets=torch.from_numpy(tokens.reshape(-1)[flat]),
            attention_mask=torch.from_numpy((tokens != pad).astype(np.int64)) if padded else None,
        )
