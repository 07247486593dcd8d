"""bertforge.model.bert: shapes, sparse == dense MLM, padding, tying, bf16, parameter count."""

import pytest
import torch

from bertforge.config import ModelConfig, preset
from bertforge.model.bert import (
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    num_parameters,
)

B, T = 3, 10


def tiny_config(**overrides) -> ModelConfig:
    # vocab 99 is no multiple of 64, so the padded rows (128 in all) are exercised.
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def batch(config: ModelConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (B, T), generator=g)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    token_type_ids[:, T // 2 :] = 1
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    return input_ids, token_type_ids, attention_mask


@pytest.fixture
def model() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(tiny_config()).eval()


def test_shapes_dense_and_sparse(model):
    ids, types, mask = batch(model.config)
    mlm, nsp = model(ids, types, mask)
    assert mlm.shape == (B, T, 99) and nsp.shape == (B, 2)
    positions = torch.tensor([0, 5, 13, 29])
    mlm, nsp = model(ids, types, mask, masked_positions=positions)
    assert mlm.shape == (4, 99) and nsp.shape == (B, 2)
    seq, pooled = model.bert(ids)
    assert seq.shape == (B, T, 32) and pooled.shape == (B, 32)
    assert model.bert(ids, pool=False)[1] is None


def test_sparse_logits_equal_dense_gathered(model):
    ids, types, mask = batch(model.config)
    positions = torch.tensor([29, 0, 5, 13, 14, 22])  # any order, across sequences
    with torch.no_grad():
        dense, nsp_dense = model(ids, types, mask)
        sparse, nsp_sparse = model(ids, types, mask, masked_positions=positions)
    torch.testing.assert_close(sparse, dense.flatten(0, 1)[positions], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp_sparse, nsp_dense)


def test_padding_is_ignored(model):
    ids, types, mask = batch(model.config)
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % model.config.vocab_size  # change only padding
    with torch.no_grad():
        seq_a, pooled_a = model.bert(ids, types, mask)
        seq_b, pooled_b = model.bert(other, types, mask)
    real = mask.bool()
    torch.testing.assert_close(seq_a[real], seq_b[real], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled_a, pooled_b, atol=1e-6, rtol=1e-6)
    # Without the mask the padding does matter: the test above is not vacuous.
    assert not torch.allclose(model.bert(ids, types)[0][real], model.bert(other, types)[0][real])


def test_no_mask_equals_all_ones_mask(model):
    ids, types, _ = batch(model.config)
    with torch.no_grad():
        a = model(ids, types, None)[0]
        b = model(ids, types, torch.ones_like(ids))[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decoder_is_tied_to_word_embeddings(model):
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.decoder_weight is emb
    assert emb.shape[0] == model.config.padded_vocab_size == 128
    # The state_dict holds the tied matrix once (safetensors refuses shared tensors).
    assert sum(t.data_ptr() == emb.data_ptr() for t in model.state_dict().values()) == 1
    # Changing the embedding matrix changes the decoder: logits = transform(h) @ E^T + b.
    ids, types, mask = batch(model.config)
    with torch.no_grad():
        seq, _ = model.bert(ids, types, mask)
        h = model.mlm.LayerNorm(torch.nn.functional.gelu(model.mlm.dense(seq)))
        manual = (h @ emb.T + model.mlm.bias)[..., :99]
        torch.testing.assert_close(model(ids, types, mask)[0], manual, atol=1e-5, rtol=1e-5)


def test_mlm_gradient_reaches_embeddings_but_not_padding_rows(model):
    ids, types, mask = batch(model.config)
    mlm, _ = model(ids, types, mask, masked_positions=torch.tensor([1, 2, 3]))
    mlm.sum().backward()
    grad = model.bert.embeddings.word_embeddings.weight.grad
    assert grad[:99].abs().sum() > 0
    assert grad[99:].abs().sum() == 0 and model.mlm.bias.grad[99:].abs().sum() == 0


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).train()
    ids, types, mask = batch(model.config)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mlm, nsp = model(ids, types, mask, masked_positions=torch.tensor([0, 4, 11]))
        loss = torch.nn.functional.cross_entropy(
            mlm.float(), torch.tensor([1, 2, 3])
        ) + torch.nn.functional.cross_entropy(nsp.float(), torch.tensor([0, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_is_deterministic_and_train_uses_dropout(model):
    ids, types, mask = batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids, types, mask)[0], model(ids, types, mask)[0])
        model.train()
        assert not torch.equal(model(ids, types, mask)[0], model(ids, types, mask)[0])


def test_sequence_classification():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(), num_labels=3)
    ids, types, mask = batch(model.config)
    assert model(ids, types, mask).shape == (B, 3)


def test_too_long_sequence_is_a_clear_error(model):
    from bertforge.errors import BertforgeError

    with pytest.raises(BertforgeError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_base_preset_has_bert_base_parameter_count():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # no memory, no initialisation cost
        ours = BertForPreTraining(preset("base", vocab_size=30522))
        theirs = transformers.BertForPreTraining(transformers.BertConfig())
        theirs_encoder = transformers.BertModel(transformers.BertConfig())
    assert num_parameters(ours) == theirs.num_parameters() == 110_106_428
    assert num_parameters(ours.bert) == theirs_encoder.num_parameters()
    assert num_parameters(ours.bert, exclude_embeddings=True) == theirs_encoder.num_parameters(
        exclude_embeddings=True
    )
    assert isinstance(ours.bert, BertModel)


def test_cpu_dropout_rate_scale_gradient_and_seeding():
    from bertforge.model.ops import dropout

    x = torch.ones(500, 1000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.25)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.005  # 500k elements: the std is 0.0006
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.75)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.25), y)  # governed by torch's generator
    assert not torch.equal(dropout(x, 0.25), y)
    half = torch.ones(64, 64, dtype=torch.bfloat16)
    assert dropout(half, 0.5).dtype == torch.bfloat16
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x


def test_under_autocast_the_residual_stream_stays_bf16():
    """No fp32 round trip between layers: each layer gets and returns bf16 activations,
    and the loss stays within bf16 rounding of fp32's."""
    from bertforge.model.ops import cross_entropy_sum

    cfg = preset(
        "tiny",
        vocab_size=300,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    ids = torch.randint(5, 300, (4, 24))
    positions = torch.arange(0, 96, 5)
    targets = torch.randint(5, 300, (len(positions),))
    seen = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        for layer in model.bert.layers
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(ids, masked_positions=positions, padded_vocab=True)
        low = cross_entropy_sum(logits, targets, 300)
    for h in hooks:
        h.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * cfg.num_hidden_layers
    full = cross_entropy_sum(model(ids, masked_positions=positions)[0], targets)
    torch.testing.assert_close(low, full, rtol=2e-2, atol=0)
