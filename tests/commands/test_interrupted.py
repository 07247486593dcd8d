"""Interrupted and failed commands leave nothing half-done.

Signals are sent by the process to itself at a fixed point of the work (patched in, in a
subprocess), never after a delay, so the tests do not depend on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import run_cli, write_corpus

ROOT = Path(__file__).resolve().parents[2]

# Runs `bertforge ARGV...` with SIGTERM sent to itself when MODULE:FUNCTION is called.
_TERM_AT = """
import os, signal, sys, importlib
module, name = sys.argv[1].split(":")
owner = importlib.import_module(module)
if "." in name:
    cls, name = name.split(".")
    owner = getattr(owner, cls)
real = getattr(owner, name)
def patched(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(owner, name, patched)
from bertforge.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _term_at(where: str, *argv: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _TERM_AT, where, *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "command,where",
    [
        ("prepare", "bertforge.data.prepare:_ShardWriter._next_shard"),
        ("tokenizer", "bertforge.data.tokenizer:_read"),
    ],
)
def test_sigterm_exits_143_in_one_line_and_removes_partial_output_and_lock(
    command, where, tmp_path, tokenizer_dir
):
    corpus = write_corpus(tmp_path / "c.txt", documents=40)
    out = tmp_path / "out"
    argv = [command, corpus, "--out", out, "--quiet"] + (
        ["--tokenizer", tokenizer_dir, "--workers", 1]
        if command == "prepare"
        else ["--vocab-size", 150]
    )
    done = _term_at(where, *argv)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == ["bertforge: stopped by SIGTERM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]  # no .partial, no .lock


@pytest.fixture(scope="module")
def bad_init(tmp_path_factory) -> Path:
    """A model directory whose config and tokenizer are fine and whose weights are not."""
    from bertforge.cli.main import main

    root = tmp_path_factory.mktemp("init")
    corpus = write_corpus(root / "c.txt", documents=40)
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus),
                "--out",
                str(root / "run"),
                "--preset",
                "tiny",
                "--max-steps",
                "1",
                "--batch-size",
                "8",
                "--seq-len",
                "32",
                "--vocab-size",
                "150",
                "--hidden-size",
                "32",
                "--intermediate-size",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    (root / "run" / "hf" / "model.safetensors").write_bytes(b"\x08" + b"\0" * 15)
    return root / "run" / "hf"


@pytest.mark.parametrize("source", ["--data", "--corpus"])
@pytest.mark.parametrize("out_existed", [False, True])
def test_a_failed_init_leaves_nothing_in_out(
    source, out_existed, bad_init, data_dir, corpus_file, tmp_path, capsys
):
    out = tmp_path / "run"
    if out_existed:
        out.mkdir()
    given = [source, data_dir if source == "--data" else corpus_file]
    code, _, err = run_cli(
        capsys,
        "pretrain",
        *given,
        "--init",
        bad_init,
        "--out",
        out,
        "--max-steps",
        2,
        "--batch-size",
        8,
        "--seq-len",
        32,
        "--quiet",
    )
    assert code == 2, err  # the tokenizer the data was made with, or the weights
    assert err.strip().splitlines()[-1].startswith("bertforge: error: ")
    if out_existed:  # the directory stays, as it was: empty
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_a_failed_start_keeps_what_was_there(bad_init, data_dir, tmp_path, capsys):
    """Only what the command made goes: an earlier run's data and tokenizer stay."""
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data_dir,
        "--out",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--max-steps",
        1,
        "--batch-size",
        8,
        "--seq-len",
        32,
        "--quiet",
    )
    assert code == 0, err
    (tmp_path / "run" / "checkpoints").rename(tmp_path / "kept")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data_dir,
        "--init",
        bad_init,
        "--out",
        tmp_path / "run",
        "--max-steps",
        2,
        "--seq-len",
        32,
        "--quiet",
    )
    assert code == 2, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


@pytest.mark.parametrize("name", ["a/b", "what?", "x" * 129, " "])
def test_a_wandb_project_name_wandb_refuses_is_refused_before_the_run_directory(
    name, data_dir, tmp_path, capsys
):
    pytest.importorskip("wandb")
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data_dir,
        "--out",
        tmp_path / "run",
        "--max-steps",
        1,
        "--wandb",
        name,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "project name" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode,hint", [("offline", False), ("", True)])
def test_the_wandb_hint_suggests_offline_only_when_it_is_not(mode, hint, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from bertforge.errors import BertforgeError
    from bertforge.train import tracking

    def refuse(**kwargs):
        raise ValueError("the server said no")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setattr(tracking, "_wandb_mode", lambda w: (mode or "online", ""))
    with pytest.raises(BertforgeError, match="the server said no") as e:
        tracking._open_wandb(tmp_path, "proj", None, "pretrain", None)
    assert ("WANDB_MODE=offline" in str(e.value)) == hint


WARMUPS = [
    ["--warmup-steps", 100, "--max-steps", 10],
    ["--warmup-steps", 10, "--max-steps", 10],
    ["--warmup-fraction", 2.0, "--max-steps", 10],
]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("warmup", WARMUPS, ids=lambda w: " ".join(map(str, w)))
def test_a_warmup_as_long_as_the_run_is_refused_in_any_form(
    command, warmup, tmp_path, data_dir, capsys
):
    argv = (
        ["pretrain", "--data", data_dir]
        if command == "pretrain"
        else ["finetune", tmp_path / "model", "--task", "sst2", "--data-dir", tmp_path]
    )
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out", *warmup)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "warmup" in err, err
    assert not (tmp_path / "out").exists()


def test_a_resume_cannot_shorten_a_run_below_its_warmup(data_dir, tmp_path, capsys):
    argv = ["pretrain", "--data", data_dir, "--out", tmp_path / "run", "--quiet"]
    code, _, err = run_cli(
        capsys,
        *argv,
        "--preset",
        "tiny",
        "--batch-size",
        8,
        "--seq-len",
        32,
        "--schedule",
        "constant",
        "--warmup-steps",
        2,
        "--max-steps",
        3,
    )
    assert code == 0, err
    code, _, err = run_cli(capsys, *argv, "--resume", "--max-steps", 2)
    assert code == 2 and "warmup_steps=2: must be fewer than max_steps (2)" in err, err


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_during_training_exits_128_plus_its_number(
    signum, code, monkeypatch, capsys
):
    from bertforge.cli import main as cli
    from bertforge.train.loop import _SignalFlag

    def second_signal(args):
        with _SignalFlag() as flag:
            os.kill(os.getpid(), signum)  # the first: flagged, training stops at the step's end
            assert flag.signum == signum
            os.kill(os.getpid(), signum)  # the second: at once
        return 0

    monkeypatch.setattr(cli, "cmd_bench", second_signal)
    assert cli.main(["bench"]) == code
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_tokenizer_streams_bounded_batches_and_shows_progress(tmp_path, monkeypatch, capsys):
    from bertforge.data import tokenizer

    corpus = write_corpus(tmp_path / "c.txt", documents=200)
    monkeypatch.setattr(tokenizer, "_BATCH_CHARS", 2000)
    fed: list[list[str]] = []
    real_read = tokenizer._read

    def read(batches, stats, bar):
        assert isinstance(batches, types.GeneratorType)  # pulled as the trainer reads
        for batch in real_read(batches, stats, bar):
            fed.append(batch)
            yield batch

    monkeypatch.setattr(tokenizer, "_read", read)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is a terminal's
    code, _, err = run_cli(
        capsys, "tokenizer", corpus, "--out", tmp_path / "tok", "--vocab-size", 150
    )
    assert code == 0, err
    longest = max(len(d) for batch in fed for d in batch)
    assert len(fed) > 10
    assert all(sum(map(len, b)) < 2000 + longest for b in fed)
    assert "tokenizer: 100%" in err and "B/s" in err  # bytes read, as prepare shows them
    assert "tokenizer: choosing the vocabulary" in err
