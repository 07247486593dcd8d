"""The chunked cross-entropy equals F.cross_entropy in fp32, loss and gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertforge.model.ops import cross_entropy_sum


def _logits(n: int = 101, v: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # n is not a multiple of the chunk: the last chunk is short
    return (torch.randn(n, v) * 4).bfloat16(), torch.randint(0, v, (n,))


def test_bf16_loss_and_gradient_match_fp32_reference():
    logits, targets = _logits()
    ours = logits.clone().requires_grad_()
    loss = cross_entropy_sum(ours, targets)
    (loss / 7).backward()
    ref = logits.float().requires_grad_()
    ref_loss = F.cross_entropy(ref, targets, reduction="sum")
    (ref_loss / 7).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert ours.grad.dtype == torch.bfloat16
    # Within bf16 rounding of the fp32 gradient (one ulp: 2**-8 relative).
    torch.testing.assert_close(ours.grad.float(), ref.grad, rtol=2**-7, atol=1e-9)


def test_no_grad_gives_the_same_loss():
    logits, targets = _logits()
    with torch.no_grad():
        plain = cross_entropy_sum(logits, targets)
    torch.testing.assert_close(
        plain, cross_entropy_sum(logits.clone().requires_grad_(), targets).detach()
    )


def test_fp32_logits_are_f_cross_entropy_exactly():
    logits, targets = _logits()
    logits = logits.float()
    assert torch.equal(
        cross_entropy_sum(logits, targets), F.cross_entropy(logits, targets, reduction="sum")
    )


def test_sparse_mlm_loss_equals_dense_loss_in_fp32():
    # The loss bertforge trains on (decoder at the masked positions only) against the
    # dense loss transformers computes (logits everywhere, labels -100 elsewhere).
    from bertforge.config import preset
    from bertforge.model.bert import BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", vocab_size=500)).eval()
    ids = torch.randint(5, 500, (4, 32))
    positions = torch.randperm(4 * 32)[:20]
    targets = torch.randint(5, 500, (20,))
    labels = torch.full((4 * 32,), -100)
    labels[positions] = targets
    with torch.no_grad():
        sparse = cross_entropy_sum(model(ids, masked_positions=positions)[0], targets) / 20
        dense = F.cross_entropy(model(ids)[0].flatten(0, 1), labels)  # mean over the 20
    assert abs(sparse.item() - dense.item()) < 1e-5
