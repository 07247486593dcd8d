"""predict: one output per input, in order, each naming its input's line; read and written
a chunk at a time."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import run_cli

from bertforge import api

pytestmark = pytest.mark.usefixtures("one_thread")

# A blank line, a lone CR inside a line, a CRLF ending, bytes that are not UTF-8, a last
# line without its newline.
RAW = b"the cat sees\n\nthe king\rsees the dog\r\n\xff\xfe the bird\n   \nlast one"
EXPECTED = [
    (1, "the cat sees"),
    (2, ""),
    (3, "the king\rsees the dog"),
    (4, "\ufffd\ufffd the bird"),
    (5, ""),
    (6, "last one"),
]


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _check(rows: list[dict]) -> None:
    assert [(r["line"], r["text"]) for r in rows] == EXPECTED
    for r in rows:
        if r["text"]:
            assert r["label"] in ("0", "1") and abs(sum(r["probabilities"].values()) - 1) < 1e-5
        else:  # an empty text has its line, and no prediction
            assert r["label"] is None and r["probabilities"] is None


def test_one_output_per_input_line_in_order(tmp_path, capsys, finetuned):
    (tmp_path / "in.txt").write_bytes(RAW)
    code, out, err = run_cli(capsys, "predict", finetuned[0], "--input", tmp_path / "in.txt")
    assert code == 0, err
    _check(_rows(out))


def test_stdin_reads_as_a_file_does(tmp_path, capsys, monkeypatch, finetuned):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(RAW)))
    code, _out, err = run_cli(
        capsys, "predict", finetuned[0], "--input", "-", "--output", tmp_path / "p.jsonl"
    )
    assert code == 0, err
    _check(_rows((tmp_path / "p.jsonl").read_text()))


def test_no_text_keeps_the_line_numbers(tmp_path, capsys, finetuned):
    (tmp_path / "in.txt").write_bytes(RAW)
    code, out, _ = run_cli(
        capsys, "predict", finetuned[0], "--input", tmp_path / "in.txt", "--no-text"
    )
    assert code == 0
    assert next(sorted(r) for r in _rows(out)) == ["label", "line", "probabilities"]
    assert [r["line"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]


def test_inputs_stream_a_chunk_at_a_time_with_progress(tmp_path, capsys, monkeypatch, finetuned):
    monkeypatch.setattr(api, "PREDICT_CHUNK", 4)
    seen: list[int] = []
    from bertforge.commands.finetune import Predictor

    call = Predictor.__call__
    monkeypatch.setattr(
        Predictor,
        "__call__",
        lambda self, texts, *a: seen.append(len(texts)) or call(self, texts, *a),
    )
    lines = [f"the cat sees the dog {i}" for i in range(10)]
    (tmp_path / "in.csv").write_text("text\n" + "\n".join(lines) + "\n")
    code, out, err = run_cli(
        capsys, "predict", finetuned[0], "--input", tmp_path / "in.csv", "--batch-size", "2"
    )
    assert code == 0, err
    rows = _rows(out)
    assert [r["line"] for r in rows] == list(range(2, 12))  # the header is line 1
    assert [r["text"] for r in rows] == lines
    assert seen == [4, 4, 2]  # never more than a chunk in memory
    assert "predict: 8 inputs" in err
