"""bertforge.hf: export / import parity against transformers on tiny random models."""

import json

import pytest
import torch

from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.hf import (
    export_model,
    from_hf_state_dict,
    import_model,
    model_config_from_hf,
    model_config_to_hf,
    to_hf_state_dict,
)
from bertforge.model.bert import BertForPreTraining

transformers = pytest.importorskip("transformers")

B, T = 3, 10
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
)


def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    token_type_ids[:, 6:] = 1  # two segments
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    return input_ids, token_type_ids, attention_mask


def hf_logits(hf_model, ids, types, mask):
    with torch.no_grad():
        out = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    return out.prediction_logits, out.seq_relationship_logits


def bf_logits(model, ids, types, mask):
    with torch.no_grad():
        return model(ids, types, mask)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def tiny_hf_model(cls=None):
    torch.manual_seed(1)
    config = transformers.BertConfig(**TINY)
    return (cls or transformers.BertForPreTraining)(config).eval()


def test_state_dict_round_trip():
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    state = BertForPreTraining(config).state_dict()
    hf = to_hf_state_dict(state, config)
    assert hf["bert.embeddings.word_embeddings.weight"].shape == (99, 32)
    assert hf["cls.predictions.bias"].shape == (99,)
    assert "bert.encoder.layer.1.attention.self.value.bias" in hf
    back = from_hf_state_dict(hf, config)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        if key in ("bert.embeddings.word_embeddings.weight", "mlm.bias"):
            assert torch.equal(back[key][:99], tensor[:99])
            assert not back[key][99:].any()  # padding comes back as zeros
        else:
            assert torch.equal(back[key], tensor), key


def test_hf_keys_match_transformers():
    config = ModelConfig(**TINY)
    ours = set(to_hf_state_dict(BertForPreTraining(config).state_dict(), config))
    theirs = set(tiny_hf_model().state_dict())
    # transformers ties the decoder to the embeddings and its bias to cls.predictions.bias.
    assert theirs - ours == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert ours <= theirs


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(0)
    model = BertForPreTraining(ModelConfig(**TINY)).eval()
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b"]
    (tokenizer_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    export_model(model, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    assert (tmp_path / "hf" / "vocab.txt").read_text().split() == vocab
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # built from vocab.txt

    hf_model, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    hf_model.eval()
    embeddings = hf_model.bert.embeddings.word_embeddings.weight
    assert hf_model.cls.predictions.decoder.weight is embeddings

    inputs = batch()
    theirs_mlm, theirs_nsp = hf_logits(hf_model, *inputs)
    ours_mlm, ours_nsp = bf_logits(model, *inputs)
    close(ours_mlm, theirs_mlm)
    close(ours_nsp, theirs_nsp)

    # The same directory serves transformers' other BERT classes.
    mlm_model = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        close(
            mlm_model(
                input_ids=inputs[0], token_type_ids=inputs[1], attention_mask=inputs[2]
            ).logits,
            ours_mlm,
        )


def test_which_transformers_classes_load_the_export_clean(tmp_path):
    """BertForPreTraining takes every key; the classes with fewer heads load every key they
    have (none missing) and report exactly the heads they lack as unexpected."""
    torch.manual_seed(0)
    export_model(BertForPreTraining(ModelConfig(**TINY)), tmp_path / "hf")
    keys = set(
        to_hf_state_dict(BertForPreTraining(ModelConfig(**TINY)).state_dict(), ModelConfig(**TINY))
    )
    heads = {k for k in keys if k.startswith("cls.")}
    expected = {
        transformers.BertForPreTraining: set(),
        transformers.BertForMaskedLM: {
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
        },
        transformers.AutoModel: heads,
    }
    assert len(heads) == 7  # the MLM transform, its bias, the NSP head
    for cls, unexpected in expected.items():
        _, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
        assert not info["missing_keys"], (cls.__name__, info["missing_keys"])
        assert set(info["unexpected_keys"]) == unexpected, cls.__name__
        assert not info["mismatched_keys"] and not info["error_msgs"], cls.__name__


def test_import_transformers_pretraining_model(tmp_path):
    hf_model = tiny_hf_model()
    hf_model.save_pretrained(tmp_path)
    model, config, info = import_model(tmp_path, with_info=True)
    assert config == ModelConfig(**TINY) and info["initialised"] == []
    model.eval()
    inputs = batch()
    theirs_mlm, theirs_nsp = hf_logits(hf_model, *inputs)
    ours_mlm, ours_nsp = bf_logits(model, *inputs)
    close(ours_mlm, theirs_mlm)
    close(ours_nsp, theirs_nsp)


def test_import_pytorch_model_bin_with_tied_decoder_keys(tmp_path):
    hf_model = tiny_hf_model()
    hf_model.config.save_pretrained(tmp_path)
    # Older checkpoints spell out the tied decoder and the position_ids buffer.
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = import_model(tmp_path)
    inputs = batch()
    close(bf_logits(model.eval(), *inputs)[0], hf_logits(hf_model, *inputs)[0])


def test_import_bare_bert_model_initialises_heads(tmp_path):
    hf_encoder = tiny_hf_model(transformers.BertModel)
    hf_encoder.save_pretrained(tmp_path)
    model, _, info = import_model(tmp_path, with_info=True)
    assert sorted(info["initialised"]) == sorted(
        (
            "mlm.dense.weight mlm.dense.bias mlm.LayerNorm.weight mlm.LayerNorm.bias mlm.bias "
            "seq_relationship.weight seq_relationship.bias"
        ).split()
    )
    ids, types, mask = batch()
    with torch.no_grad():
        theirs = hf_encoder(input_ids=ids, token_type_ids=types, attention_mask=mask)
        seq, pooled = model.eval().bert(ids, types, mask)
    close(seq, theirs.last_hidden_state)
    close(pooled, theirs.pooler_output)


def test_config_round_trip_and_refusals():
    config = ModelConfig(**TINY)
    raw = model_config_to_hf(config)
    assert raw["architectures"] == ["BertForPreTraining"] and raw["model_type"] == "bert"
    assert model_config_from_hf(json.loads(json.dumps(raw))) == config
    # transformers' own config.json, extra keys and all, maps onto the same ModelConfig.
    assert model_config_from_hf(transformers.BertConfig(**TINY).to_dict()) == config
    with pytest.raises(BertforgeError, match="gelu"):
        model_config_from_hf({**raw, "hidden_act": "gelu_new"})
    with pytest.raises(BertforgeError, match="absolute"):
        model_config_from_hf({**raw, "position_embedding_type": "relative_key"})
    with pytest.raises(BertforgeError, match="roberta"):
        model_config_from_hf({**raw, "model_type": "roberta"})


def test_import_errors_are_clear(tmp_path):
    with pytest.raises(BertforgeError, match=r"no config.json"):
        import_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(ModelConfig(**TINY))))
    with pytest.raises(BertforgeError, match="no weights"):
        import_model(tmp_path)


def test_exported_tokenizer_truncates_to_the_position_table(tmp_path, tokenizer_dir):
    """tokenizer_config.json's model_max_length is the model's max_position_embeddings,
    so a pipeline that truncates stays within the 64 positions of this model."""
    torch.manual_seed(0)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model = BertForPreTraining(ModelConfig(**{**TINY, "vocab_size": len(vocab)})).eval()
    out = export_model(model, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["model_max_length"] == 64
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the [MASK] cat sees the dog near the river. " * 40  # ~400 tokens
    assert len(tok(text, truncation=True)["input_ids"]) == 64
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    assert len(fill(text, tokenizer_kwargs={"truncation": True})) > 0  # no position overflow
    # The run's own tokenizer directory is left as it was.
    assert (
        json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["model_max_length"] == 512
    )
