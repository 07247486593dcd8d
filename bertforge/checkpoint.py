"""Atomic checkpoints: safetensors weights, optimizer state, JSON run state.

A checkpoint is written into a temporary directory, every file fsynced, then renamed
into place; `checkpoints/latest` is replaced (also atomically) only after that. Each
file's sha256 is recorded in state.json and verified on load, so a truncated or
corrupted checkpoint is detected and the previous good one used instead. Nothing
pickled is ever loaded without `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bertforge.errors import BertforgeError

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


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


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write checkpoints/step-NNNNNN atomically and point `latest` at it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model_state(model), str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        for f in files:
            _fsync(tmp / f)
        state = dict(state, step=step, checksums={f: _sha256(tmp / f) for f in files})
        _write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
        if final.exists():  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertforgeError(f"could not write checkpoint {final}: {e.strerror or e}; "
                             f"the previous checkpoint is untouched") from None
    _write_text_atomic(ckpt_dir / "latest", name + "\n")
    _prune(ckpt_dir, keep_last, keep=name)
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p.name for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())
    for old in complete[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The state.json of a complete, uncorrupted checkpoint; BertforgeError otherwise."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise BertforgeError(f"{path / STATE_FILE}: missing or unreadable") from None
    for f, digest in state.get("checksums", {}).items():
        if not (path / f).exists() or _sha256(path / f) != digest:
            raise BertforgeError(f"{path / f}: checksum mismatch (truncated or corrupted)")
    return state


def find_latest(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, falling back past corrupted ones."""
    if not ckpt_dir.is_dir():
        return None
    names = sorted((p.name for p in ckpt_dir.glob("step-*") if p.is_dir()), reverse=True)
    latest = ckpt_dir / "latest"
    if latest.exists():  # prefer what `latest` names, then anything older
        named = latest.read_text().strip()
        if named in names:
            names.remove(named)
            names.insert(0, named)
    for name in names:
        try:
            return ckpt_dir / name, verify(ckpt_dir / name)
        except BertforgeError as e:
            print(f"warning: skipping checkpoint: {e}", file=sys.stderr)
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / MODEL_FILE))


def load_optimizer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
