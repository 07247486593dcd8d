"""The GPU kernels of bertforge.model.ops, run on the CPU: they must agree with the CPU ones.

`ops.use_kernels("gpu")` takes the paths a CUDA run takes (SDPA, F.dropout,
F.cross_entropy, _foreach_norm) on CPU tensors, so everything but the CUDA kernels
themselves is checked here. Tolerances are stated where the two paths round differently.
"""

from __future__ import annotations

import pytest
import torch

from bertforge.config import preset
from bertforge.model import ops
from bertforge.model.bert import BertForPreTraining


def _qkv(seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 4, 17, 16)  # (B, nh, T, hd)
    return [torch.randn(shape, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _padding_mask() -> torch.Tensor:
    lengths = torch.tensor([17, 9, 1])
    return (torch.arange(17)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)


@pytest.mark.parametrize("masked", [False, True], ids=["packed", "padded"])
def test_sdpa_path_equals_the_cpu_attention_forward_and_backward(masked):
    mask = _padding_mask() if masked else None
    grads = {}
    outputs = {}
    for path in ops.PATHS:
        q, k, v = _qkv(0)
        with ops.use_kernels(path):
            y = ops.attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outputs[path], grads[path] = y.detach(), [t.grad for t in (q, k, v)]
    # float64: the two paths differ only by summation order.
    torch.testing.assert_close(outputs["gpu"], outputs["cpu"], atol=1e-12, rtol=1e-10)
    for a, b in zip(grads["gpu"], grads["cpu"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_sdpa_path_in_bf16_stays_within_bf16_rounding():
    q, k, v = (t.detach().bfloat16() for t in _qkv(1))
    mask = _padding_mask()
    with ops.use_kernels("cpu"):
        cpu = ops.attention(q, k, v, attn_mask=mask).float()
    with ops.use_kernels("gpu"):
        gpu = ops.attention(q, k, v, attn_mask=mask).float()
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=2e-2)  # a few bf16 ulps


def test_the_model_gives_the_same_logits_on_both_paths():
    cfg = preset("tiny", vocab_size=300, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).double().eval()
    ids = torch.randint(5, 300, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    with ops.use_kernels("cpu"):
        cpu, _ = model(ids, attention_mask=mask)
    with ops.use_kernels("gpu"):
        gpu, _ = model(ids, attention_mask=mask)
    torch.testing.assert_close(gpu, cpu, atol=1e-10, rtol=1e-10)


def test_gpu_dropout_path_is_f_dropout_and_follows_torch_seed():
    x = torch.ones(200, 300)
    with ops.use_kernels("gpu"):
        torch.manual_seed(3)
        y = ops.dropout(x, 0.3)
        torch.manual_seed(3)
        expected = torch.nn.functional.dropout(x, 0.3, training=True)
        assert torch.equal(y, expected)
        assert ops.dropout(x, 0.3, training=False) is x


def test_cross_entropy_and_hits_agree_on_both_paths():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(70, 1000, generator=g).bfloat16()
    targets = torch.randint(0, 1000, (70,), generator=g)
    targets[:10] = logits[:10].float().argmax(-1)  # some hits
    results = {}
    for path in ops.PATHS:
        x = logits.clone().requires_grad_(True)
        with ops.use_kernels(path):
            loss, hits = ops.cross_entropy_and_hits(x, targets)
        loss.backward()
        results[path] = (loss.item(), int(hits), x.grad.float())
    (loss_c, hits_c, grad_c), (loss_g, hits_g, grad_g) = results["cpu"], results["gpu"]
    assert loss_c == pytest.approx(loss_g, rel=1e-6)
    assert hits_c == hits_g >= 10
    torch.testing.assert_close(grad_c, grad_g, atol=1e-3, rtol=1e-2)  # bf16 gradients


def test_gradient_norm_agrees_on_both_paths():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) * 1e-2 for n in (7, 20000, 100000)]
    exact = sum(float(t.double().square().sum()) for t in grads)
    for path in ops.PATHS:
        with ops.use_kernels(path):
            assert float(ops.grad_norm_squared(grads)) == pytest.approx(exact, rel=1e-6)


def test_a_run_on_the_gpu_kernels_trains(tmp_path, data_dir):
    """Pretraining through SDPA, F.dropout (0.1) and F.cross_entropy: the loss falls."""
    import json

    from conftest import tiny_run_config

    from bertforge.commands.pretrain import run_pretrain

    cfg = tiny_run_config(eval_every=0)
    cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.1
    with ops.use_kernels("gpu"):
        run_pretrain(tmp_path / "run", cfg, data_dir=data_dir, show_progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    curve = [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0, curve
