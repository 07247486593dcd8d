"""fill-mask: the text echoed with its masks numbered, each token quoted, JSON naming each
mask, a --top-k below one refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import one_line_error, run_cli, tiny_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from bertforge.hf import export_model

    return export_model(
        tiny_model(tokenizer_dir),
        tmp_path_factory.mktemp("fill") / "hf",
        tokenizer_dir=tokenizer_dir,
    )


def test_fill_mask_echoes_the_text_and_numbers_its_masks(capsys, hf_dir):
    code, out, err = run_cli(
        capsys, "fill-mask", hf_dir, "the small [MASK] sees the [MASK].", "--top-k", "2"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "the small [MASK 1] sees the [MASK 2]."
    assert lines[1].startswith("[MASK 1]: ") and lines[2].startswith("[MASK 2]: ")
    assert len(lines) == 3 and " at " not in out  # no unexplained token positions


def test_fill_mask_with_one_mask(capsys, hf_dir):
    code, out, _ = run_cli(capsys, "fill-mask", hf_dir, "the small [MASK] sees the dog.")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "the small [MASK] sees the dog."
    assert lines[1].startswith("[MASK]: ") and len(lines) == 2
    # Each token quoted, so that a predicted "," or "(" reads as a token, not punctuation.
    pred = r'"(?:[^"\\]|\\.)*" \(\d\.\d{3}\)'
    assert re.fullmatch(rf"\[MASK\]: {pred}(, {pred}){{4}}", lines[1]), lines[1]


def test_fill_mask_json_names_each_mask(capsys, hf_dir):
    code, out, _ = run_cli(
        capsys, "fill-mask", hf_dir, "the [MASK] sees the [MASK].", "--json", "--top-k", "1"
    )
    results = json.loads(out)
    assert code == 0 and [r["mask_index"] for r in results] == [0, 1]
    assert [r["position"] for r in results] == [2, 5]  # tokens from [CLS] at 0
    assert all(len(r["predictions"]) == 1 for r in results)


def test_fill_mask_refuses_a_top_k_below_one(capsys, hf_dir):
    code, _, err = run_cli(capsys, "fill-mask", hf_dir, "the [MASK].", "--top-k", "0")
    assert code == 2 and "--top-k: '0': must be >= 1" in one_line_error(err)
