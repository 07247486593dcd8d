"""The command line: error cases end in one line and exit 2; the stages chain."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bertforge.cli import parse_duration
from conftest import run_cli




def one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, match", [
    (["pretrain", "--corpus", "no/such/file.txt", "--out", "{tmp}/r"], "no/such/file.txt"),
    (["pretrain", "--corpus", "{empty}", "--out", "{tmp}/r"], "no documents"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--preset", "huge"],
     "unknown preset 'huge'"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--hidden-size", "100",
      "--num-attention-heads", "3"], "divisible by num_attention_heads"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--lr", "-1"], "lr"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--time-budget", "soon"],
     "invalid duration"),
    (["evaluate", "{tmp}/nope"], "run directory not found"),
    (["export", "{tmp}/nope", "--out", "{tmp}/hf"], "run directory not found"),
    (["tokenizer", "{tmp}/missing.txt", "--out", "{tmp}/tok"], "missing.txt"),
    (["fill-mask", "{tmp}/nope", "a [MASK] b"], "not found"),
])
def test_errors_are_one_line_exit_2(capsys, tmp_path, corpus_file, argv, match):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    subs = {"tmp": str(tmp_path), "corpus": str(corpus_file),
            "empty": str(tmp_path / "empty.txt")}
    code, _, err = run_cli(capsys, *(a.format(**subs) for a in argv))
    assert code == 2
    assert match in one_line_error(err)


def test_durations():
    assert parse_duration("90") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400


def test_stages_chain(capsys, tmp_path, corpus_file):
    tok, data, run, hf = (str(tmp_path / x) for x in ("tok", "data", "run", "hf"))
    assert run_cli(capsys, "tokenizer", str(corpus_file), "--out", tok, "--vocab-size", "200",
                   "--quiet")[0] == 0
    assert run_cli(capsys, "prepare", str(corpus_file), "--tokenizer", tok, "--out", data,
                   "--seq-len", "32", "--valid-fraction", "0.05", "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "pretrain", "--data", data, "--out", run, "--preset", "tiny",
                             "--seq-len", "32", "--max-steps", "5", "--batch-size", "8",
                             "--micro-batch-size", "4", "--quiet")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["step"] == 5
    code, out, _ = run_cli(capsys, "evaluate", run)
    first = json.loads(out)
    assert {"mlm_loss", "mlm_accuracy", "perplexity", "unigram_baseline_loss"} <= set(first)
    assert json.loads(run_cli(capsys, "evaluate", run)[1]) == first  # fixed masking seed
    assert run_cli(capsys, "export", run, "--out", hf)[0] == 0
    code, out, _ = run_cli(capsys, "fill-mask", hf, "the small [MASK] sees the dog.",
                           "--json", "--top-k", "3")
    preds = json.loads(out)[0]["predictions"]
    assert len(preds) == 3 and all(0 <= p["score"] <= 1 for p in preds)
    # a second pretrain into the same directory without --resume is refused
    code, _, err = run_cli(capsys, "pretrain", "--data", data, "--out", run, "--preset", "tiny",
                           "--seq-len", "32", "--max-steps", "5", "--quiet")
    assert code == 2 and "--resume" in one_line_error(err)


def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bertforge", "evaluate", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert one_line_error(proc.stderr).startswith("bertforge: error:")
