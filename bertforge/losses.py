"""Cross-entropy over a large vocabulary, computed in fp32 chunk by chunk.

`F.cross_entropy(logits.float(), ...)` on (N, V) bf16 logits materialises several fp32
(N, V) tensors (the upcast, the log-probabilities, their gradient) and streams each
through memory; for N = 600 masked tokens and V = 30522 that is ~75 MB apiece, and on a
CPU the loss then costs more than the decoder matmul. Here rows are processed in chunks
that stay in cache: only the (N,) log-sum-exp is kept for backward, and the gradient is
written straight back in the logits' dtype. Results equal F.cross_entropy in fp32.
"""

from __future__ import annotations

import torch

_CHUNK_ROWS = 64


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            lse[start:start + _CHUNK_ROWS] = torch.logsumexp(
                logits[start:start + _CHUNK_ROWS].float(), dim=-1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return (lse - target_logits).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            end = start + _CHUNK_ROWS
            p = (logits[start:end].float() - lse[start:end, None]).exp_()  # softmax
            p[rows[: p.shape[0]], targets[start:end]] -= 1.0
            out[start:end] = p.mul_(grad)
        return out, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(logits_i)[targets_i], in fp32, for (N, V) logits of any dtype."""
    if logits.dtype == torch.float32 or logits.shape[0] == 0:
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)
