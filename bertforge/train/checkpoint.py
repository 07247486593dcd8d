"""Atomic checkpoints: safetensors weights, optimizer state, JSON run state.

A checkpoint is written into a temporary directory, every file fsynced, then renamed
into place; `checkpoints/latest` is replaced (also atomically) only after that, and
older checkpoints are pruned only after that. Each file's sha256, and one of state.json's
own content, is recorded in state.json and verified on load, so a truncated or corrupted
checkpoint is detected and the previous good one used instead. A resume takes the newest
checkpoint that verifies (`latest` names it too, unless a kill fell between the rename
and the update of `latest`). Nothing pickled is ever loaded without `weights_only=True`,
and weights that are not finite (a diverged run) are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bertforge.errors import BertforgeError
from bertforge.fileio import fsync, give_usual_mode, make_dir, write_text_atomic

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"
_PREFIX = "step-"


def _name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named step-NNNNNN; None for anything else."""
    digits = path.name[len(_PREFIX):]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, oldest first (by number, not by name)."""
    found = [(step_of(p), p) for p in ckpt_dir.glob(f"{_PREFIX}*") if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_digest(state: dict[str, Any]) -> str:
    """sha256 of state.json's content (without its own digest), canonically serialised."""
    rest = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write checkpoint `path`'s state.json (atomically), sealed with its own sha256.

    `state["checksums"]` must already hold the sha256 of each file it names.
    """
    state = dict(state, state_sha256=_state_digest(state))
    write_text_atomic(path / STATE_FILE, json.dumps(state, indent=1))


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
            raise BertforgeError(f"{doing}: weight {name} is not finite (NaN or infinity): "
                                 f"training diverged; lower --lr")


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `model_state` (tied tensors stored once) into `model`;
    BertforgeError naming the keys when they do not fit."""
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and t.shape != own[name].shape:
            raise BertforgeError(f"checkpoint does not match the model: {name} has shape "
                                 f"{tuple(t.shape)}, the model's config says "
                                 f"{tuple(own[name].shape)}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    stored = {own[k].data_ptr() for k in weights if k in own}
    truly_missing = [k for k in missing if own[k].data_ptr() not in stored]
    if truly_missing or unexpected:
        raise BertforgeError(f"checkpoint does not match the model: missing {truly_missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def save_checkpoint(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None, state: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write checkpoints/step-NNNNNN atomically, point `latest` at it, prune old ones.

    `weights` is `model_state(model)` (or the same gathered from shards); `optimizer_state`
    an optimizer's state_dict.

    Weights that are not finite are refused (BertforgeError) before anything is written.
    On a failed write (a full disk, say) nothing that was complete before is touched: the
    partial checkpoint is removed and BertforgeError raised.
    """
    name = _name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    require_finite(weights, f"not saving checkpoint {name}")
    try:
        make_dir(ckpt_dir)
        remove_partial(ckpt_dir)
        tmp.mkdir()
        save_file(weights, str(tmp / MODEL_FILE))
        give_usual_mode(tmp / MODEL_FILE)  # safetensors leaves its private 0600
        files = [MODEL_FILE]
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        for f in files:
            fsync(tmp / f)
        write_state(tmp, dict(state, step=step,
                              checksums={f: _sha256(tmp / f) for f in files}))
        if final.exists():  # this step from an abandoned attempt (newer than the resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(ckpt_dir)
        write_text_atomic(ckpt_dir / "latest", name + "\n")
    # safetensors and torch.save report a failed write as errors of their own
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertforgeError(f"could not write checkpoint {final}: {_write_error(e)}; "
                             f"the previous checkpoint is untouched") from None
    _prune(ckpt_dir, keep_last, step)
    return final


def remove_partial(ckpt_dir: Path) -> None:
    """Remove the partial checkpoints (hidden .tmp directories) a run killed mid-save left."""
    for stale in ckpt_dir.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_error(e: Exception) -> str:
    """Why a write failed, in a few words: 'No space left on device'."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    code = re.search(r"os error (\d+)", str(e))  # safetensors: "...(os error 28)"
    if code:
        return os.strerror(int(code.group(1)))
    # torch.save: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return "write failed (" + re.sub(r"^\[enforce fail at [^]]*\]\s*\.?\s*", "", first) + ")"


def _prune(ckpt_dir: Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to `step` (the one just written).

    Newer ones belong to an attempt that was abandoned (a resume fell back past them);
    they are left alone, and overwritten as the run reaches their steps again.
    """
    done = [p for s, p in _checkpoints(ckpt_dir) if s <= step and (p / STATE_FILE).exists()]
    for old in done[:-keep_last]:
        if step_of(old) != step:
            shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The state.json of a complete, uncorrupted checkpoint; BertforgeError otherwise."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise BertforgeError(f"{path / STATE_FILE}: missing or unreadable "
                             f"(truncated or corrupted)") from None
    checksums = state.get("checksums") if isinstance(state, dict) else None
    sealed = state.get("state_sha256") if isinstance(state, dict) else None
    # (checkpoints written before state.json was sealed have no state_sha256)
    if (not isinstance(checksums, dict) or MODEL_FILE not in checksums
            or (sealed is not None and sealed != _state_digest(state))):
        raise BertforgeError(f"{path / STATE_FILE}: checksum mismatch (corrupted)")
    step, named = state.get("step"), step_of(path)
    if (not isinstance(step, int) or isinstance(step, bool) or step < 0
            or (named is not None and step != named)):
        raise BertforgeError(f"{path / STATE_FILE}: step {_short(repr(step))} is not the "
                             f"checkpoint's ({path.name})")
    for f, digest in checksums.items():
        if not (path / f).is_file():
            raise BertforgeError(f"{path / f}: missing")
        if _sha256(path / f) != digest:
            raise BertforgeError(f"{path / f}: checksum mismatch (truncated or corrupted)")
    return state


def any_checkpoint(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds any checkpoint directory, complete or not."""
    return ckpt_dir.is_dir() and bool(_checkpoints(ckpt_dir))


def find_latest(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, falling back past corrupted ones.

    Only complete checkpoints are candidates (a partial one is a hidden .tmp directory),
    so this is `latest` unless that one is corrupted or a kill came just after a rename.
    """
    if not ckpt_dir.is_dir():
        return None
    for _, path in reversed(_checkpoints(ckpt_dir)):
        try:
            return path, verify(path)
        except BertforgeError as e:
            print(f"warning: skipping checkpoint: {e}", file=sys.stderr)
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / MODEL_FILE)


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; BertforgeError if it cannot be read."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types
        raise BertforgeError(f"{file}: cannot be read ({_short(str(e), 200)})") from None


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state; refused if unpickling needs anything but tensors and plain
    containers (`load_pickled`)."""
    return load_pickled(path / OPTIMIZER_FILE)


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
            lines = [x.strip() for x in text.splitlines() if x.strip()
                     and "weights_only" not in x and not x.startswith("Check the doc")]
            reason = (lines or [type(e).__name__])[0].removeprefix("WeightsUnpickler error: ")
        raise BertforgeError(f"{file}: refused to load, it is not plain tensor data "
                             f"({_short(reason)})") from None


def _short(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters: an error stays one short line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
