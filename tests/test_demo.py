"""scripts/demo.sh (`make demo`): its stages, a quoted home, an earlier run kept, an
interrupted demo continued, the shipped sample as the default corpus."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"


# ------------------------------------------------------------------------- scripts/demo.sh


def stub_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A BIN directory whose bertforge and python only append their arguments to a log,
    one per line, each call ended by '--': the demo's stages run without training."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name in ("bertforge", "python"):
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\n{{ echo {name}; for a in "$@"; do printf "%s\\n" "$a"; '
            f'done; echo --; }} >> "{log}"\n'
        )
        script.chmod(0o755)
    return bin_dir, log


def run_demo(
    tmp_path: Path,
    corpus: str,
    out: Path,
    extra: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/demo.sh with HOME in tmp_path and the stub BIN: (the process, its calls)."""
    bin_dir, log = stub_bin(tmp_path)
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "BIN": str(bin_dir),
        "DEMO_CORPUS": corpus,
        "DEMO_OUT": str(out),
        "DEMO_STEPS": "10",
        **(extra or {}),
    }
    proc = subprocess.run(
        ["bash", str(DEMO)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    calls = (
        [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
        if log.exists()
        else []
    )
    return proc, calls


@pytest.fixture
def home_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "home" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("one document.\n")
    (corpus / "b.txt").write_text("another document.\n")
    return corpus


def test_demo_expands_a_quoted_home(tmp_path, home_corpus):
    """The README's `make demo DEMO_CORPUS='~/corpus/*.txt'`: the ~ arrives unexpanded."""
    proc, calls = run_demo(tmp_path, "~/corpus/*.txt", tmp_path / "runs" / "demo")
    assert proc.returncode == 0, proc.stderr
    tokenizer, prepare = calls[0], calls[1]
    assert tokenizer[:2] == ["bertforge", "tokenizer"]
    assert tokenizer[2] == f"{home_corpus}/*.txt"  # expanded; bertforge globs it
    assert prepare[:3] == ["bertforge", "prepare", f"{home_corpus}/*.txt"]
    assert "~" not in proc.stdout.splitlines()[0]


def test_demo_without_a_corpus_says_how_to_give_one(tmp_path):
    proc, calls = run_demo(tmp_path, "~/nothing/*.txt", tmp_path / "runs" / "demo")
    assert proc.returncode == 2 and not calls
    assert f"no corpus at '{tmp_path}/home/nothing/*.txt'" in proc.stderr
    assert "DEMO_CORPUS='~/corpus/*.txt'" in proc.stderr


def test_demo_keeps_an_earlier_run(tmp_path, home_corpus):
    runs = tmp_path / "runs"
    (runs / "demo" / "run").mkdir(parents=True)
    (runs / "demo" / "run" / "metrics.jsonl").write_text("{}\n")  # an earlier demo
    proc, calls = run_demo(tmp_path, str(home_corpus), runs / "demo")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert f"{runs / 'demo'} holds an earlier demo, kept" in first
    assert str(runs / "demo-2") in first
    assert (runs / "demo" / "run" / "metrics.jsonl").read_text() == "{}\n"
    assert calls[0][calls[0].index("--out") + 1] == str(runs / "demo-2" / "tokenizer")

    (runs / "demo-2" / "x").write_text("")  # demo-2 taken too (the stub wrote nothing)
    proc, calls = run_demo(tmp_path, str(home_corpus), runs / "demo")
    assert str(runs / "demo-3") in proc.stdout.splitlines()[0]
    assert calls[0][calls[0].index("--out") + 1] == str(runs / "demo-3" / "tokenizer")


def test_an_interrupted_demo_is_continued_not_restarted(tmp_path, home_corpus):
    out = tmp_path / "runs" / "demo"
    proc, _ = run_demo(tmp_path, str(home_corpus), out)
    assert proc.returncode == 0, proc.stderr
    # As a demo killed during pretraining leaves it: tokenizer and data done, a checkpoint.
    (out / "demo.done").unlink()
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (out / "data").mkdir()
    (out / "data" / "manifest.json").write_text("{}")
    (out / "run" / "checkpoints" / "step-250").mkdir(parents=True)
    proc, calls = run_demo(tmp_path, str(home_corpus), out)
    assert proc.returncode == 0, proc.stderr
    assert f"continuing the unfinished demo in {out}" in proc.stdout
    assert not (tmp_path / "runs" / "demo-2").exists()
    commands = [c[1] for c in calls if c[0] == "bertforge"]
    assert commands == ["pretrain", "evaluate", "fill-mask", "fill-mask"]  # no tokenizer again
    pretrain = next(c for c in calls if c[1:2] == ["pretrain"])
    assert "--resume" in pretrain and pretrain[pretrain.index("--out") + 1] == str(out / "run")
    assert pretrain[pretrain.index("--max-steps") + 1] == "10"
    assert "export" not in commands  # pretrain exports to RUN/hf, once
    assert (out / "demo.done").exists()
    # Finished, it is kept: the next demo goes beside it.
    proc, _ = run_demo(tmp_path, str(home_corpus), out)
    assert str(tmp_path / "runs" / "demo-2") in proc.stdout.splitlines()[0]


def test_a_demo_with_other_settings_does_not_continue_an_unfinished_one(tmp_path, home_corpus):
    out = tmp_path / "runs" / "demo"
    run_demo(tmp_path, str(home_corpus), out)
    (out / "demo.done").unlink()
    proc, _calls = run_demo(tmp_path, str(home_corpus), out, {"DEMO_STEPS": "20"})
    assert "continuing" not in proc.stdout and str(tmp_path / "runs" / "demo-2") in proc.stdout


def test_the_demo_defaults_to_the_shipped_sample_and_its_tokenizer(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    bin_dir, log = stub_bin(tmp_path)
    out = tmp_path / "demo"
    proc = subprocess.run(
        ["bash", str(DEMO)],
        env={**env, "BIN": str(bin_dir), "DEMO_OUT": str(out)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
    assert next(c[1] for c in calls if c[0] == "bertforge") == "prepare"  # no training
    assert calls[0][2] == "data/enwiki-2015-sample.txt.xz"
    assert (out / "tokenizer" / "vocab.txt").read_text().splitlines()[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    assert "8192 tokens" in proc.stdout
    pretrain = next(c for c in calls if c[1:2] == ["pretrain"])
    assert pretrain[pretrain.index("--max-steps") + 1] == "3600"
    assert pretrain[pretrain.index("--warmup-steps") + 1] == "180"


def test_demo_uses_an_empty_output_directory(tmp_path, home_corpus):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    proc, calls = run_demo(tmp_path, str(home_corpus), tmp_path / "runs" / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "kept" not in proc.stdout
    assert calls[0][calls[0].index("--out") + 1] == str(tmp_path / "runs" / "demo" / "tokenizer")
