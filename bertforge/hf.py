"""Export to and import from Hugging Face BERT directories.

One explicit key map (`KEY_MAP`, bertforge name -> transformers name) drives both
directions; `to_hf_state_dict` and `from_hf_state_dict` are its two readings and the exact
reverse of each other. Three things are not one-to-one renames: the fused `qkv` projection
(`FUSED_QKV`), the vocabulary padded to a multiple of 64 (`VOCAB_PADDED`), and the MLM
decoder tied to the word embeddings, which is not written (transformers ties it on load)
and on import is accepted only if it really is tied. A fine-tuned classifier exports
through the same map plus `CLASSIFIER_KEY_MAP`. The map's rules:
docs/architecture.md#the-hugging-face-key-map; what loads an export:
docs/evaluation-and-export.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bertforge.config import ModelConfig, build
from bertforge.errors import BertforgeError
from bertforge.fileio import give_usual_mode, make_dir
from bertforge.model.bert import BertForPreTraining, BertForSequenceClassification
from bertforge.paths import replace_owned, require_owned, sibling
from bertforge.weights import load_pickled, load_safetensors, require_finite

log = logging.getLogger("bertforge")

# bertforge key -> transformers BertForPreTraining key; "{i}" is the layer index.
KEY_MAP: dict[str, str] = {
    "bert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
    "bert.layers.{i}.attention.out.weight": "bert.encoder.layer.{i}.attention.output.dense.weight",
    "bert.layers.{i}.attention.out.bias": "bert.encoder.layer.{i}.attention.output.dense.bias",
    "bert.layers.{i}.attention_norm.weight": "bert.encoder.layer.{i}.attention.output.LayerNorm.weight",  # noqa: E501
    "bert.layers.{i}.attention_norm.bias": "bert.encoder.layer.{i}.attention.output.LayerNorm.bias",
    "bert.layers.{i}.ffn_in.weight": "bert.encoder.layer.{i}.intermediate.dense.weight",
    "bert.layers.{i}.ffn_in.bias": "bert.encoder.layer.{i}.intermediate.dense.bias",
    "bert.layers.{i}.ffn_out.weight": "bert.encoder.layer.{i}.output.dense.weight",
    "bert.layers.{i}.ffn_out.bias": "bert.encoder.layer.{i}.output.dense.bias",
    "bert.layers.{i}.ffn_norm.weight": "bert.encoder.layer.{i}.output.LayerNorm.weight",
    "bert.layers.{i}.ffn_norm.bias": "bert.encoder.layer.{i}.output.LayerNorm.bias",
    "bert.pooler.dense.weight": "bert.pooler.dense.weight",
    "bert.pooler.dense.bias": "bert.pooler.dense.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.LayerNorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.LayerNorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",
    "seq_relationship.weight": "cls.seq_relationship.weight",
    "seq_relationship.bias": "cls.seq_relationship.bias",
}

# bertforge BertForSequenceClassification's head -> transformers' (the encoder, pooler
# included, goes through KEY_MAP). Read on import only when asked (`classifier=True`).
CLASSIFIER_KEY_MAP: dict[str, str] = {
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}

# bertforge fused key -> the transformers keys it concatenates (dim 0, in this order).
FUSED_QKV: dict[str, tuple[str, ...]] = {
    f"bert.layers.{{i}}.attention.qkv.{p}": tuple(
        f"bert.encoder.layer.{{i}}.attention.self.{name}.{p}" for name in ("query", "key", "value")
    )
    for p in ("weight", "bias")
}

# bertforge keys whose first dimension is padded_vocab_size (vocab_size in transformers).
VOCAB_PADDED = ("bert.embeddings.word_embeddings.weight", "mlm.bias")

# transformers keys that carry nothing of their own: buffers, and the tied decoder.
_TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
# Prefixes of a bare BertModel / AutoModel checkpoint, which lacks the "bert." prefix.
_BARE_PREFIXES = ("embeddings.", "encoder.", "pooler.")


def _layer_keys(config: ModelConfig) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """KEY_MAP and FUSED_QKV with "{i}" expanded for every layer."""
    renames, fused = {}, {}
    for i in range(config.num_hidden_layers):
        for bf, hf in KEY_MAP.items():
            renames[bf.format(i=i)] = hf.format(i=i)
        for bf, hfs in FUSED_QKV.items():
            fused[bf.format(i=i)] = tuple(k.format(i=i) for k in hfs)
    return renames, fused


def to_hf_state_dict(
    bf_state_dict: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """bertforge BertForPreTraining (or BertForSequenceClassification) state_dict ->
    transformers keys of the same class."""
    renames, fused = _layer_keys(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in bf_state_dict.items():
        if key in fused:
            for hf_key, part in zip(fused[key], tensor.chunk(3, dim=0)):
                out[hf_key] = part
        elif key in renames:
            if key in VOCAB_PADDED:
                tensor = tensor[: config.vocab_size]  # (vocab_size, ...): padding dropped
            out[renames[key]] = tensor
        elif key in CLASSIFIER_KEY_MAP:
            out[CLASSIFIER_KEY_MAP[key]] = tensor
        else:
            raise BertforgeError(f"cannot export: unknown bertforge weight {key!r}")
    return out


def from_hf_state_dict(
    hf_state_dict: dict[str, torch.Tensor], config: ModelConfig, classifier: bool = False
) -> dict[str, torch.Tensor]:
    """transformers BERT state_dict -> bertforge keys (the reverse of to_hf_state_dict).

    Accepts BertForPreTraining / BertForMaskedLM keys ("bert.", "cls.") and bare
    BertModel keys; the result then lacks the head weights it had no source for.
    Weights of other heads (e.g. a sequence classifier, unless `classifier`) are logged
    and skipped.
    """
    hf = {_normalise_key(k): v for k, v in hf_state_dict.items()}
    renames, fused = _layer_keys(config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for bf_key, hf_keys in fused.items():
        present = [k for k in hf_keys if k in hf]
        if present and len(present) < 3:
            raise BertforgeError(f"checkpoint has {present[0]!r} but not all of query/key/value")
        if present:
            parts = [hf[k] for k in hf_keys]
            if len({p.shape for p in parts}) > 1 or parts[0].dim() == 0:
                raise BertforgeError(
                    f"checkpoint's query/key/value {hf_keys[0]!r} ... have "
                    f"shapes {[tuple(p.shape) for p in parts]}"
                )
            out[bf_key] = torch.cat(parts, dim=0)  # (3H, ...)
            used.update(hf_keys)
    for bf_key, hf_key in renames.items():
        if hf_key not in hf:
            continue
        tensor = hf[hf_key]
        if bf_key in VOCAB_PADDED:
            tensor = _pad_vocab(tensor, config)
        out[bf_key] = tensor
        used.add(hf_key)
    for bf_key, hf_key in CLASSIFIER_KEY_MAP.items() if classifier else ():
        if hf_key in hf:
            out[bf_key] = hf[hf_key]
            used.add(hf_key)
    for hf_key, tied_to in _TIED.items():
        if hf_key in hf:
            if tied_to in hf and not torch.equal(hf[hf_key], hf[tied_to]):
                raise BertforgeError(
                    f"checkpoint's {hf_key} is not tied to {tied_to}; "
                    "bertforge always ties the MLM decoder"
                )
            used.add(hf_key)
    used.update(k for k in _BUFFERS if k in hf)
    skipped = sorted(set(hf) - used)
    if skipped:
        log.warning(
            "ignoring %d checkpoint weight(s) bertforge has no place for: %s",
            len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return out


def _normalise_key(key: str) -> str:
    """Bare BertModel keys get the "bert." prefix; TF-era LayerNorm gamma/beta are renamed."""
    if key.startswith(_BARE_PREFIXES):
        key = "bert." + key
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def _pad_vocab(tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    rows = tensor.shape[0] if tensor.dim() else 0
    if rows != config.vocab_size:
        raise BertforgeError(
            f"checkpoint has a vocabulary of {rows} rows but "
            f"config.json says vocab_size={config.vocab_size}"
        )
    padding = tensor.new_zeros((config.padded_vocab_size - config.vocab_size, *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)  # (padded_vocab_size, ...)


# ---------------------------------------------------------------------------- config.json

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def model_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json of an exported model."""
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        **{name: getattr(config, name) for name in _MODEL_FIELDS},
        # Read by transformers 4.x (5.x knows only absolute positions); states our choice.
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
        "use_cache": False,
        "classifier_dropout": None,
        "dtype": "float32",
    }


def model_config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a Hugging Face BERT config.json; refuses what bertforge cannot run
    (and, as every ModelConfig, a model too large for this machine's memory)."""
    if not isinstance(raw, dict):
        raise BertforgeError(f"config.json: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise BertforgeError(
            f"config.json: model_type {model_type!r} is not supported (only 'bert')"
        )
    refusals = {
        "hidden_act": ("gelu", "activation {!r} is not supported (only 'gelu')"),
        "position_embedding_type": (
            "absolute",
            "position_embedding_type {!r} is not supported (only 'absolute')",
        ),
        "is_decoder": (False, "is_decoder={!r}: bertforge builds encoders only"),
        "add_cross_attention": (False, "add_cross_attention={!r} is not supported"),
    }
    for key, (allowed, message) in refusals.items():
        if raw.get(key, allowed) != allowed:
            raise BertforgeError("config.json: " + message.format(raw[key]))
    values = {name: raw[name] for name in _MODEL_FIELDS if raw.get(name) is not None}
    return build(ModelConfig, values, "config.json")  # each value of its field's type


# ------------------------------------------------------------------------------ directories


def export_model(
    model: BertForPreTraining | BertForSequenceClassification,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors (fp32) and the tokenizer.

    `model` is a BertForPreTraining, or a BertForSequenceClassification with
    `extra_config=classifier_config_to_hf(...)`; extra_config entries go into config.json.
    """
    final = Path(out_dir)
    require_finite(model.state_dict(), f"not exporting to {final}")  # before anything is written
    require_owned(final, "export")
    # Written beside, then swapped in whole: a kill never mixes two exports' files.
    out = sibling(final)
    make_dir(final.parent)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        _write_export(model, out, tokenizer_dir, extra_config)
        replace_owned(out, final, "export")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


def _write_export(
    model: BertForPreTraining | BertForSequenceClassification,
    out: Path,
    tokenizer_dir: str | Path | None,
    extra_config: dict[str, Any] | None,
) -> None:
    config = model.config
    weights = to_hf_state_dict(model.state_dict(), config)
    # safetensors wants contiguous, unshared CPU tensors; qkv chunks are views of one tensor.
    weights = {
        k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in weights.items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    give_usual_mode(out / "model.safetensors")  # safetensors leaves its temporary file's 0600
    raw = {**model_config_to_hf(config), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer_dir is not None:
        from bertforge.data.tokenizer import copy_tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise BertforgeError(f"tokenizer directory not found: {tokenizer_dir}")
        # A pipeline then truncates to what the position table holds.
        copy_tokenizer(tokenizer_dir, out, model_max_length=config.max_position_embeddings)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory; BertforgeError if absent or malformed."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise BertforgeError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(config_path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise BertforgeError(f"{config_path}: not valid JSON ({e})") from None


def import_model(hf_dir: str | Path, *, with_info: bool = False) -> tuple:
    """A BertForPreTraining (and its ModelConfig) from a Hugging Face BERT directory.

    Weights are read from model.safetensors (or a sharded model.safetensors.index.json),
    else from pytorch_model.bin (weights_only). Head weights the checkpoint lacks (a bare
    BertModel / AutoModel checkpoint has no MLM or NSP head) are freshly initialised and
    logged. with_info=True also returns {"initialised": [bertforge keys]}.
    """
    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    config = model_config_from_hf(raw)
    hf_state = _load_weights(hf_dir)
    state = from_hf_state_dict(hf_state, config)

    model = BertForPreTraining(config)  # randomly initialised; the checkpoint overwrites it
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise BertforgeError(
                f"{hf_dir}: weight {key} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in state]
    if any(k.startswith("bert.layers.") or k.startswith("bert.embeddings.") for k in missing):
        raise BertforgeError(f"{hf_dir}: checkpoint lacks encoder weights, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning(
            "%s: initialised %d weight(s) the checkpoint does not have: %s",
            hf_dir,
            len(missing),
            ", ".join(missing),
        )
    if with_info:
        return model, config, {"initialised": missing}
    return model, config


def classifier_config_to_hf(labels: list[str] | None) -> dict[str, Any]:
    """config.json entries of a sequence classifier; labels None means regression."""
    names = labels if labels is not None else ["LABEL_0"]
    return {
        "architectures": ["BertForSequenceClassification"],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": ("regression" if labels is None else "single_label_classification"),
    }


def import_classifier(hf_dir: str | Path) -> tuple[BertForSequenceClassification, dict[str, Any]]:
    """(bertforge BertForSequenceClassification, raw config.json) from a Hugging Face
    BertForSequenceClassification directory, such as `bertforge finetune` exports."""
    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    config = model_config_from_hf(raw)
    state = from_hf_state_dict(_load_weights(hf_dir), config, classifier=True)
    if "classifier.weight" not in state:
        raise BertforgeError(f"{hf_dir}: not a sequence classifier (no classifier weights)")
    model = BertForSequenceClassification(config, state["classifier.weight"].shape[0])
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise BertforgeError(
                f"{hf_dir}: weight {key} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BertforgeError(f"{hf_dir}: checkpoint lacks weights, e.g. {missing[0]}")
    model.load_state_dict(state)
    return model.eval(), raw


def _load_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF directory: model.safetensors, the shards its index names, or
    pytorch_model.bin (weights_only: a planted pickle is refused, naming what it wants)."""
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    pickled = hf_dir / "pytorch_model.bin"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in _shards(index):
            state.update(load_safetensors(hf_dir / shard))
        return state
    if pickled.is_file():
        state = load_pickled(pickled)
        if not (
            isinstance(state, dict)
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
        ):
            raise BertforgeError(f"{pickled}: not a state dict (names to tensors)")
        return state
    raise BertforgeError(f"{hf_dir}: no weights (model.safetensors or pytorch_model.bin)")


def _shards(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names; refused unless each is a
    relative path that stays in the index's directory (not ../../etc/passwd). The name is
    checked, not resolved: HF's cache links the files of a model directory elsewhere."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BertforgeError(
            f"{index}: not a safetensors index (no weight_map of names to shard files)"
        ) from None
    for shard in shards:
        if (
            not isinstance(shard, str)
            or not shard
            or Path(shard).is_absolute()
            or ".." in Path(shard).parts
        ):
            raise BertforgeError(
                f"{index}: refused shard {shard!r:.80}: not a file in {index.parent}"
            )
    return shards
