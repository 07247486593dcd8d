"""The run directory's layout: the names of what `bertforge pretrain` writes in RUN_DIR.

Loading a model from a run lives in bertforge.commands.loading; this module imports
nothing above the foundation, so every layer may name a run's files.
"""

from __future__ import annotations

from pathlib import Path

from bertforge.errors import BertforgeError

CONFIG, TOKENIZER, DATA, CHECKPOINTS, METRICS, HF = (
    "config.yaml",
    "tokenizer",
    "data",
    "checkpoints",
    "metrics.jsonl",
    "hf",
)
LOCK = ".lock"  # held by the command writing the directory (fileio.hold_lock)


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def require_run_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BertforgeError(f"run directory not found: {path}")
    if not is_run_dir(path):
        raise BertforgeError(f"{path} is not a bertforge run directory (no {CONFIG})")
    return path
