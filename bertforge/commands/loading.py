"""Loading a model: from a run directory (its newest good checkpoint, or one named), from a
Hugging Face directory, or as the starting point of a run (`--init`).

Every model loaded here has its tokenizer checked against its config first
(`consistency.check_tokenizer_fits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bertforge import rundir
from bertforge.config import ModelConfig, RunConfig
from bertforge.errors import BertforgeError
from bertforge.train import checkpoint as ckpt
from bertforge.train.consistency import check_tokenizer_fits

if TYPE_CHECKING:
    from bertforge.model.bert import BertForPreTraining


def load_run_model(
    run_dir: Path, checkpoint: Path | None = None
) -> tuple[BertForPreTraining, RunConfig, Path]:
    """The BertForPreTraining of a run's newest good checkpoint (or `checkpoint`)."""
    from bertforge.model.bert import BertForPreTraining

    run_dir = rundir.require_run_dir(run_dir)
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    if checkpoint is None:
        found = ckpt.find_latest(run_dir / rundir.CHECKPOINTS)
        if found is None:
            raise BertforgeError(f"{run_dir} has no complete checkpoint yet")
        checkpoint = found[0]
    else:
        ckpt.verify(checkpoint)
    check_tokenizer_fits(cfg.model, run_dir / rundir.TOKENIZER)
    model = BertForPreTraining(cfg.model)
    ckpt.load_model_weights(model, ckpt.load_weights(checkpoint))
    return model.eval(), cfg, run_dir / rundir.TOKENIZER


def load_any_model(path: Path) -> tuple[BertForPreTraining, Path]:
    """(BertForPreTraining in eval mode, tokenizer dir) from a run dir or an HF directory."""
    path = Path(path)
    if rundir.is_run_dir(path):
        model, _, tok = load_run_model(path)
        return model, tok
    if (path / "config.json").is_file():
        from bertforge.hf import import_model

        model, config = import_model(path)[:2]
        check_tokenizer_fits(config, path)
        return model.eval(), path
    if not path.exists():
        raise BertforgeError(f"model not found: {path}")
    raise BertforgeError(
        f"{path} is neither a bertforge run directory ({rundir.CONFIG}) nor a "
        f"Hugging Face model directory (config.json)"
    )


def init_source(path: Path) -> tuple[ModelConfig, Path]:
    """(architecture, tokenizer directory) of a model to start a run from (`--init`): a
    Hugging Face BERT directory, a bertforge run directory, or one of its checkpoints."""
    path = Path(path)
    if (path / ckpt.STATE_FILE).is_file() and rundir.is_run_dir(path.parent.parent):
        path = path.parent.parent  # a checkpoint: the run it belongs to has the rest
    if rundir.is_run_dir(path):
        config = RunConfig.load(path / rundir.CONFIG).model
        check_tokenizer_fits(config, path / rundir.TOKENIZER)
        return config, path / rundir.TOKENIZER
    if (path / "config.json").is_file():
        from bertforge.hf import model_config_from_hf, read_hf_config

        raw = read_hf_config(path)
        if not isinstance(raw, dict):
            raise BertforgeError(f"{path / 'config.json'}: not a JSON object")
        if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
            raise BertforgeError(f"{path}: no tokenizer (tokenizer.json or vocab.txt)")
        config = model_config_from_hf(raw)
        check_tokenizer_fits(config, path)
        return config, path
    load_any_model(path)  # raises the error that says what is wrong with `path`
    raise AssertionError("unreachable")


def load_init_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The BertForPreTraining weights of `init_source`'s model, and the keys it lacks (an
    MLM head from a bare BertModel, an NSP head from a BertForMaskedLM)."""
    path = Path(path)
    if (path / ckpt.STATE_FILE).is_file() and rundir.is_run_dir(path.parent.parent):
        ckpt.verify(path)
        return ckpt.load_weights(path), []
    if rundir.is_run_dir(path):
        model, _, _ = load_run_model(path)
        return ckpt.model_state(model), []
    from bertforge.hf import import_model

    model, _, info = import_model(path, with_info=True)
    return ckpt.model_state(model), list(info["initialised"])
