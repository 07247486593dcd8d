"""The run directory layout (DESIGN.md) and loading a model from a run or HF directory."""

from __future__ import annotations

from pathlib import Path

import torch

from bertforge import checkpoint as ckpt
from bertforge.config import RunConfig
from bertforge.errors import BertforgeError

CONFIG, TOKENIZER, DATA, CHECKPOINTS, METRICS, HF = (
    "config.yaml", "tokenizer", "data", "checkpoints", "metrics.jsonl", "hf")


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def require_run_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BertforgeError(f"run directory not found: {path}")
    if not is_run_dir(path):
        raise BertforgeError(f"{path} is not a bertforge run directory (no {CONFIG})")
    return path


def load_run_model(run_dir: Path, checkpoint: Path | None = None
                   ) -> tuple[torch.nn.Module, RunConfig, Path]:
    """The BertForPreTraining of a run's newest good checkpoint (or `checkpoint`)."""
    from bertforge.model import BertForPreTraining

    run_dir = require_run_dir(run_dir)
    cfg = RunConfig.load(run_dir / CONFIG)
    if checkpoint is None:
        found = ckpt.find_latest(run_dir / CHECKPOINTS)
        if found is None:
            raise BertforgeError(f"{run_dir} has no complete checkpoint yet")
        checkpoint = found[0]
    else:
        ckpt.verify(checkpoint)
    model = BertForPreTraining(cfg.model)
    ckpt.load_model_weights(model, ckpt.load_weights(checkpoint))
    return model.eval(), cfg, run_dir / TOKENIZER


def load_any_model(path: Path) -> tuple[torch.nn.Module, Path]:
    """(BertForPreTraining in eval mode, tokenizer dir) from a run dir or an HF directory."""
    path = Path(path)
    if is_run_dir(path):
        model, _, tok = load_run_model(path)
        return model, tok
    if (path / "config.json").is_file():
        from bertforge.hf import import_model
        model, _ = import_model(path)[:2]
        return model.eval(), path
    if not path.exists():
        raise BertforgeError(f"model not found: {path}")
    raise BertforgeError(f"{path} is neither a bertforge run directory ({CONFIG}) nor a "
                         f"Hugging Face model directory (config.json)")
