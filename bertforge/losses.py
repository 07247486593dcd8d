"""Cross-entropy over a large vocabulary, computed in fp32 chunk by chunk.

`F.cross_entropy(logits.float(), ...)` on (N, V) bf16 logits materialises several fp32
(N, V) tensors (the upcast, the log-probabilities, their gradient) and streams each
through memory; for N = 600 masked tokens and V = 30522 that is ~75 MB apiece, and on a
CPU the loss then costs more than the decoder matmul. Here rows are processed in chunks
that stay in cache, and the forward pass, which has the exponentials at hand anyway,
writes the softmax straight into the gradient buffer (in the logits' dtype); backward
only subtracts 1 at the targets and scales by the incoming gradient, one pass instead
of recomputing the softmax. The loss equals F.cross_entropy in fp32; the gradient is
rounded once more (to the logits' dtype before the scaling), within one ulp of it.
"""

from __future__ import annotations

import torch

_CHUNK_ROWS = 32  # (32, 30522) fp32 is 3.9 MB: in cache


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        keep = ctx.needs_input_grad[0]  # no softmax to keep under no_grad (evaluation)
        probs = torch.empty_like(logits) if keep else None  # (N, V), becomes the gradient
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            x = logits[rows].float()  # (c, V)
            top = x.amax(dim=1, keepdim=True)
            total = x.sub_(top).exp_().sum(dim=1, keepdim=True)
            lse[rows] = (top + total.log()).squeeze(1)
            if keep:
                probs[rows] = x.div_(total)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        if keep:
            ctx.save_for_backward(probs, targets, target_logits - lse)
        return (lse - target_logits).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, targets, target_log_probs = ctx.saved_tensors  # backward runs once: in place
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs[rows, targets] = (target_log_probs.exp() - 1.0).to(probs.dtype)  # p - 1, fp32
        return probs.mul_(grad), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(logits_i)[targets_i], in fp32, for (N, V) logits of any dtype."""
    if logits.dtype == torch.float32 or logits.shape[0] == 0:
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)
