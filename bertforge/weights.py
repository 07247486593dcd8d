"""Model weights as tensors and files, below every layer that saves or loads them.

`model_state` takes a model's weights once each (the tied MLM decoder is stored once),
`load_model_weights` puts them back with an error naming any key that does not fit, and
`require_finite` refuses weights a diverged run left. Files are read only through
`load_safetensors` and `load_pickled`, which loads with `weights_only=True` and names what
a planted file asked for instead of running it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bertforge.errors import BertforgeError


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, tied tensors stored once, detached and contiguous on the CPU."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied (the MLM decoder shares the word embeddings)
            continue
        seen[t.data_ptr()] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def require_finite(weights: dict[str, torch.Tensor], doing: str) -> None:
    """BertforgeError naming the first tensor of `weights` with a NaN or an infinity;
    `doing` says what is refused ("not saving checkpoint step-000005")."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BertforgeError(
                f"{doing}: weight {name} is not finite (NaN or infinity): "
                f"training diverged; lower --lr"
            )


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `model_state` (tied tensors stored once) into `model`;
    BertforgeError naming the keys when they do not fit."""
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and t.shape != own[name].shape:
            raise BertforgeError(
                f"checkpoint does not match the model: {name} has shape "
                f"{tuple(t.shape)}, the model's config says "
                f"{tuple(own[name].shape)}"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    stored = {own[k].data_ptr() for k in weights if k in own}
    truly_missing = [k for k in missing if own[k].data_ptr() not in stored]
    if truly_missing or unexpected:
        raise BertforgeError(
            f"checkpoint does not match the model: missing {truly_missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; BertforgeError if it cannot be read."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types
        raise BertforgeError(f"{file}: cannot be read ({short(str(e), 200)})") from None


def load_pickled(file: Path) -> Any:
    """A torch.save file read with weights_only=True; BertforgeError if it needs anything
    but tensors and plain containers, which is how a planted file would run code.

    The refusal names the global the file asked for. torch's own message goes on to advise
    loading the file with weights_only=False, i.e. running the code: that is never passed on.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        text = str(e).strip()
        # torch 2.6-2.13: "Unsupported global: GLOBAL x.y was not an allowed global..." or
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        wanted = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
        if wanted:
            reason = f"it asks for the global {wanted.group(1)}"
        else:  # the first line that is not torch's advice about weights_only
            lines = [
                x.strip()
                for x in text.splitlines()
                if x.strip() and "weights_only" not in x and not x.startswith("Check the doc")
            ]
            reason = (lines or [type(e).__name__])[0].removeprefix("WeightsUnpickler error: ")
        raise BertforgeError(
            f"{file}: refused to load, it is not plain tensor data ({short(reason)})"
        ) from None


def short(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters: an error stays one short line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
