"""What bertforge writes has the usual file modes: 0666 less the umask, for exports and
checkpoints alike."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_exported_files_have_the_usual_mode(tmp_path, tokenizer_dir, umask_022):
    from bertforge.hf import export_model

    out = export_model(tiny_model(tokenizer_dir), tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    found = modes(out)
    assert "model.safetensors" in found and "config.json" in found and "vocab.txt" in found
    assert found == {name: 0o644 for name in found}  # 0666 less the umask, as everywhere


def test_checkpoint_files_have_the_usual_mode(tmp_path, tokenizer_dir, umask_022):
    from bertforge.train.checkpoint import model_state, save_checkpoint

    model = tiny_model(tokenizer_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(
        tmp_path / "checkpoints", 1, model_state(model), optimizer.state_dict(), {"step": 1}
    )
    found = modes(path)
    assert "model.safetensors" in found and "state.json" in found
    assert found == {name: 0o644 for name in found}
