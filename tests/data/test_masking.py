"""MLM masking: rates, 80/10/10, specials untouched, determinism per sequence."""

import numpy as np
import pytest

from bertforge.data.masking import Masker, hash_uniform

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def batch(rows=512, t=128, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, size=(rows, t))
    tokens[:, 0] = SPECIAL["cls"]
    tokens[:, -1] = SPECIAL["sep"]
    tokens[:, 60] = SPECIAL["sep"]
    tokens[-1, 100:] = SPECIAL["pad"]
    return tokens


def test_hash_uniform_is_uniform_and_deterministic():
    index = np.arange(1000)
    u = hash_uniform(0, 0, index, 128, 1)
    assert u.shape == (1000, 128) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    np.testing.assert_array_equal(u, hash_uniform(0, 0, index, 128, 1))
    assert not np.array_equal(u, hash_uniform(0, 1, index, 128, 1))  # epoch matters
    assert not np.array_equal(u, hash_uniform(1, 0, index, 128, 1))  # seed matters


def test_rates_and_80_10_10():
    tokens = batch()
    m = Masker(1000, SPECIAL)
    out = m(tokens, np.arange(len(tokens)), seed=0, epoch=0)
    maskable = (tokens >= 5).sum()
    n = out.targets.numel()
    assert abs(n / maskable - 0.15) < 0.005
    flat_in = out.input_ids.reshape(-1)[out.masked_positions].numpy()
    targets = out.targets.numpy()
    frac_mask = (flat_in == SPECIAL["mask"]).mean()
    frac_same = (flat_in == targets).mean()
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.01
    assert abs(frac_random - 0.1) < 0.01 + 0.001  # a random draw may equal the target
    assert abs(frac_same - 0.1) < 0.01 + 0.001
    # random replacements are never special tokens
    assert (flat_in[flat_in != targets] != SPECIAL["pad"]).all()


def test_specials_never_masked_and_unmasked_positions_untouched():
    tokens = batch()
    out = Masker(1000, SPECIAL, mask_rate=0.4)(tokens, np.arange(len(tokens)), 0, 0)
    flat = tokens.reshape(-1)
    assert (flat[out.masked_positions.numpy()] >= 5).all()
    keep = np.ones(flat.size, bool)
    keep[out.masked_positions.numpy()] = False
    np.testing.assert_array_equal(out.input_ids.reshape(-1).numpy()[keep], flat[keep])
    assert out.attention_mask is not None and out.attention_mask[-1, 100:].sum() == 0


def test_mask_depends_only_on_sequence_not_on_batch():
    tokens = batch(rows=64)
    index = np.arange(1000, 1064)
    m = Masker(1000, SPECIAL)
    whole = m(tokens, index, 7, 3)
    part = m(tokens[10:20], index[10:20], 7, 3)
    np.testing.assert_array_equal(whole.input_ids[10:20].numpy(), part.input_ids.numpy())


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.4])
def test_configurable_rate(rate):
    tokens = batch()
    out = Masker(1000, SPECIAL, mask_rate=rate)(tokens, np.arange(len(tokens)), 1, 0)
    assert abs(out.targets.numel() / (tokens >= 5).sum() - rate) < 0.01


def test_token_masking_is_the_hash_threshold():
    # Token masking must stay exactly what it was: selection at hash < rate, per position,
    # so runs started before the masking variants resume with the same masks.
    tokens = batch(rows=32)
    index = np.arange(500, 532)
    m = Masker(1000, SPECIAL, mask_rate=0.3)
    selected, unit = m.select(tokens, index, 5, 2)
    expected = (tokens >= 5) & (hash_uniform(5, 2, index, tokens.shape[1], 1) < 0.3)
    np.testing.assert_array_equal(selected, expected)
    np.testing.assert_array_equal(unit, np.where(expected.reshape(-1), np.arange(tokens.size), -1))
