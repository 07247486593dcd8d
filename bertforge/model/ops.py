"""The kernels that differ between the CPU and GPUs, each picked by its tensor's device.

Every device-specific kernel of the model and the training step lives here, and nothing
else in bertforge branches on the device type for speed. Each has a hand-made CPU path,
where the generic kernel is slow, and PyTorch's kernel on a GPU:

- `attention`: two batched matmuls and a softmax; GPU, SDPA.
- `dropout`: a {0, 1} mask from numpy SFC64 bits; GPU, `F.dropout`.
- `cross_entropy_and_hits` (and `cross_entropy_sum`): fp32 in cache-sized chunks, the
  hits read off the row maxima; GPU, `F.cross_entropy` and one `amax`.
- `grad_norm_squared`: float64 sums of float32 chunk norms; GPU, `torch._foreach_norm`.
- `pad_decoder`: whether the MLM decoder runs on the padded vocabulary.

Under `torch.compile` every function takes the generic path whatever the device, which
Inductor fuses. `use_kernels("gpu")` runs the GPU paths on the CPU too, which is how the
test suite checks them; nothing else sets it. Why, with the measurements:
docs/performance.md#kernels-per-device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# A plain module global, not a ContextVar: torch.compile traces a global read (and guards
# on its value) but breaks the graph at ContextVar.get.
_forced: str | None = None
PATHS = ("cpu", "gpu")


@contextlib.contextmanager
def use_kernels(path: str) -> Iterator[None]:
    """Within the block, take the `path` kernels ('cpu' or 'gpu') whatever the device."""
    if path not in PATHS:
        raise ValueError(f"kernel path {path!r}: must be one of {', '.join(PATHS)}")
    global _forced
    before, _forced = _forced, path
    try:
        yield
    finally:
        _forced = before


def kernel_path(t: torch.Tensor) -> str:
    """'cpu' for tensors on the CPU, 'gpu' for any accelerator (CUDA, ROCm, MPS, XPU)."""
    return _forced or ("cpu" if t.device.type == "cpu" else "gpu")


def generic(t: torch.Tensor) -> bool:
    """Whether to take the generic kernels: on GPUs, and whenever torch.compile traces."""
    return torch.compiler.is_compiling() or kernel_path(t) == "gpu"


def pad_decoder(t: torch.Tensor) -> bool:
    """Whether the MLM decoder should compute on the padded vocabulary: where the generic
    kernels run (the aligned width serves cuBLAS, and Inductor fuses the masking of the
    padding columns into the loss), and under autocast, where the CPU's chunked
    cross-entropy skips the padding columns for free and the full weight is the leaf
    whose bf16 copy autocast caches for the step. Eager fp32 on the CPU takes the real
    rows: its cross-entropy (F.cross_entropy) would pay a pass to mask the padding."""
    return generic(t) or torch.is_autocast_enabled(t.device.type)


# ----------------------------------------------------------------------------- attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, nh, T, hd); attn_mask (B, 1, 1, T) bool,
    True = attend, or None (every token real: the flash kernel's case)."""
    if kernel_path(q) == "gpu":  # compiled on the CPU, the two matmuls below fuse better
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, nh, T, T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = dropout(scores.softmax(-1), dropout_p)
    return probs @ v  # (B, nh, T, hd)


# ------------------------------------------------------------------------------- dropout


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout; on the CPU with a faster mask.

    The CPU path draws one 64-bit seed from torch's global generator (so `torch.manual_seed`
    and the RNG state saved in checkpoints govern it as they govern F.dropout), expands it
    with numpy's SFC64 into 16 random bits per element, and turns those into a {0, 1} mask
    in x's dtype with three vectorised integer passes; forward and backward are then one
    multiply each. An element is kept when its 16 bits reach a threshold, so p is rounded
    to a multiple of 1/65536.
    """
    if not training or p == 0.0:
        return x
    if generic(x):
        return F.dropout(x, p, training=True)
    n = x.numel()
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw(-(-n // 4))  # (ceil(n / 4),) uint64
    bits = torch.from_numpy(words.view(np.int16)[:n]).view(x.shape)  # uniform int16
    threshold = round(p * 65536) - 32768  # keep where bits >= threshold
    keep = bits.clamp_(threshold - 1, threshold).sub_(threshold - 1).to(x.dtype)  # 0 or 1
    return (x * keep).mul_(1.0 / (1.0 - p))


# ------------------------------------------------------------------------- cross-entropy

_CHUNK_ROWS = 32  # (32, 30522) fp32 is 3.9 MB: in a CPU core's cache


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The CPU cross-entropy. `F.cross_entropy(logits.float(), ...)` on (N, V) bf16 logits
    materialises several fp32 (N, V) tensors (the upcast, the log-probabilities, their
    gradient) and streams each through memory. Here rows go in chunks that stay in cache,
    and the forward pass, which has the exponentials at hand anyway, writes the softmax
    straight into the gradient buffer (in the logits' dtype); backward only subtracts 1 at
    the targets and scales, one pass instead of recomputing the softmax. The loss equals
    F.cross_entropy in fp32; the gradient is rounded once more (to the logits' dtype
    before the scaling), within one ulp of it. The row maxima the softmax needs also give
    the hits for free (an argmax over bf16 logits costs more than this whole pass).
    Columns from `vocab_size` on (a padded vocabulary's) are read by no pass and get a
    zero gradient."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = vocab_size
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        top = torch.empty_like(lse)  # (N,) row maxima
        keep = ctx.needs_input_grad[0]  # no softmax to keep under no_grad (evaluation)
        probs = torch.empty_like(logits) if keep else None  # (N, W), becomes the gradient
        if probs is not None and v < logits.shape[1]:
            probs[:, v:] = 0
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            x = logits[rows, :v].to(torch.float32, copy=True)  # (c, V)
            top[rows] = x.amax(dim=1)
            total = x.sub_(top[rows, None]).exp_().sum(dim=1, keepdim=True)
            lse[rows] = top[rows] + total.squeeze(1).log()
            if probs is not None:
                probs[rows, :v] = x.div_(total)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        hits = (target_logits == top).sum()
        ctx.mark_non_differentiable(hits)
        if keep:
            ctx.save_for_backward(probs, targets, target_logits - lse)
        return (lse - target_logits).sum(), hits

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, targets, target_log_probs = ctx.saved_tensors  # backward runs once: in place
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs[rows, targets] = (target_log_probs.exp() - 1.0).to(probs.dtype)  # p - 1, fp32
        return probs.mul_(grad), None, None


def cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """sum_i -log softmax(logits_i)[targets_i], in fp32, for (N, V) logits of any dtype."""
    return cross_entropy_and_hits(logits, targets, vocab_size)[0]


def cross_entropy_and_hits(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed fp32 cross-entropy of (N, W) logits, the rows whose target has the
    largest logit): loss and accuracy in one pass. A tie with another token counts as a
    hit, on every path (an argmax would pick the first).

    vocab_size: the real vocabulary when the logits are `padded_vocab_size` wide (the
    model's training output: a row stride the fast matmul kernels take). The columns past
    it are no tokens: they are left out of the softmax and get a zero gradient.
    """
    width = logits.shape[1]
    v = width if vocab_size is None else vocab_size
    if generic(logits) or logits.dtype == torch.float32 or logits.shape[0] == 0:
        x = logits.float()  # (N, W)
        if v < width:
            x = x.masked_fill(torch.arange(width, device=x.device) >= v, float("-inf"))
        loss = F.cross_entropy(x, targets, reduction="sum")
        with torch.no_grad():
            target_logits = x.gather(1, targets[:, None]).squeeze(1)
            hits = (target_logits == x.amax(dim=1)).sum()
        return loss, hits
    return _ChunkedCrossEntropy.apply(logits, targets, v)


# ------------------------------------------------------------------------- gradient norm


def grad_norm_squared(grads: list[torch.Tensor]) -> torch.Tensor:
    """sum over `grads` of sum(g**2), a float64 0-dim tensor on their device (no host sync).

    CPU: float32 norms of rows of 16,384 elements, squared and summed in float64; a
    float32 reduction of one large gradient (the word embeddings) is off by up to 1e-3
    relative on the CPU, differently for each sharding, and under FSDP that made the
    clipped losses drift from one process's. GPU: one `_foreach_norm` launch (tree
    reductions, ~1e-7 relative) instead of several kernels per gradient.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    if kernel_path(grads[0]) == "gpu":
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).double().square().sum()
    # The small gradients (dozens of biases and LayerNorm weights, where a few kernels
    # apiece cost more than the arithmetic) go end to end into one buffer, chunked as one.
    small = [g.reshape(-1) for g in grads if g.numel() <= _NORM_CHUNK]
    parts = [_chunked_squares(g) for g in grads if g.numel() > _NORM_CHUNK]
    if small:
        parts.append(_chunked_squares(torch.cat(small)))
    return torch.stack(parts).sum()


_NORM_CHUNK = 1 << 14  # float32 sums of this many elements are exact to ~1e-7 relative


def _chunked_squares(t: torch.Tensor, chunk: int = _NORM_CHUNK) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    whole = flat.numel() // chunk * chunk
    total = flat[whole:].double().square().sum()
    if whole:
        rows = torch.linalg.vector_norm(flat[:whole].view(-1, chunk), dim=1)  # (n / chunk,)
        total = total + rows.double().square().sum()
    return total
