"""bertforge: pretrain BERT models from scratch on your own corpus.

The Python API (bertforge.api) is here at the top: `bertforge.pretrain(...)`,
`finetune`, `evaluate`, `export`, `fill_mask`, `predict`, ... and the configs they take.
They load on first use, so that `import bertforge` imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BertforgeError",
    "DataConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "MaskFill",
    "ModelConfig",
    "PretrainResult",
    "RunConfig",
    "TrainConfig",
    "__version__",
    "evaluate",
    "export",
    "fill_mask",
    "finetune",
    "glue",
    "predict",
    "predict_file",
    "prepare",
    "preset",
    "pretrain",
    "report",
    "train_tokenizer",
]
# The module that holds each name of __all__ (loaded when the name is first used).
_CONFIGS = ("RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "preset")
_EXPORTS = {
    name: (
        "bertforge.config"
        if name in _CONFIGS
        else "bertforge.finetune_config"
        if name == "FinetuneConfig"
        else "bertforge.errors"
        if name == "BertforgeError"
        else "bertforge.api"
    )
    for name in __all__
    if name != "__version__"
}

if TYPE_CHECKING:
    from bertforge.api import (
        FinetuneResult,
        MaskFill,
        PretrainResult,
        evaluate,
        export,
        fill_mask,
        finetune,
        glue,
        predict,
        predict_file,
        prepare,
        pretrain,
        report,
        train_tokenizer,
    )
    from bertforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
    from bertforge.errors import BertforgeError
    from bertforge.finetune_config import FinetuneConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bertforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # found here from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
