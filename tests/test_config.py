"""Config validation and presets."""

import pytest

from bertforge.config import PRESETS, ModelConfig, RunConfig, TrainConfig, preset
from bertforge.errors import BertforgeError


def test_presets_sizes():
    assert PRESETS["mini"] == (4, 256, 4)
    cfg = preset("base")
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    ) == (12, 768, 12, 3072)
    for name in PRESETS:
        c = preset(name)
        assert c.intermediate_size == 4 * c.hidden_size


def test_unknown_preset():
    with pytest.raises(BertforgeError, match="unknown preset 'huge'"):
        preset("huge")


def test_heads_must_divide_hidden():
    with pytest.raises(BertforgeError, match=r"hidden_size.*num_attention_heads"):
        ModelConfig(hidden_size=100, num_attention_heads=3)


def test_padded_vocab():
    assert ModelConfig(vocab_size=30522).padded_vocab_size == 30528
    assert ModelConfig(vocab_size=128).padded_vocab_size == 128


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"train": {"lr": -1}}, "lr"),
        ({"train": {"learning_rate": 1}}, "unknown key 'learning_rate'"),
        ({"train": {"batch_size": "big"}}, "batch_size: expected int"),
        ({"data": {"mask_rate": 1.5}}, "mask_rate"),
        ({"optim": {}}, "unknown section 'optim'"),
    ],
)
def test_bad_values_name_the_key(raw, match):
    with pytest.raises(BertforgeError, match=match):
        RunConfig.from_dict(raw)


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(model=preset("tiny"), train=TrainConfig(max_steps=5, time_budget=60.0))
    cfg.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == cfg
