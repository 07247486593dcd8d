"""What a new user meets first: the demo script, the command's surface, failed commands
that leave nothing behind, config.yaml recording the data as prepared, exported files'
modes and fill-mask's output."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bertforge import __version__
from conftest import one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64)


# ------------------------------------------------------------------------- scripts/demo.sh

def stub_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A BIN directory whose bertforge and python only append their arguments to a log,
    one per line, each call ended by '--': the demo's stages run without training."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name in ("bertforge", "python"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\n{{ echo {name}; for a in "$@"; do printf "%s\\n" "$a"; '
                          f'done; echo --; }} >> "{log}"\n')
        script.chmod(0o755)
    return bin_dir, log


def run_demo(tmp_path: Path, corpus: str, out: Path, extra: dict[str, str] | None = None,
             ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/demo.sh with HOME in tmp_path and the stub BIN: (the process, its calls)."""
    bin_dir, log = stub_bin(tmp_path)
    log.unlink(missing_ok=True)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "BIN": str(bin_dir),
           "DEMO_CORPUS": corpus, "DEMO_OUT": str(out), "DEMO_STEPS": "10", **(extra or {})}
    proc = subprocess.run(["bash", str(DEMO)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()] \
        if log.exists() else []
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
    proc, calls = run_demo(tmp_path, str(home_corpus), out, {"DEMO_STEPS": "20"})
    assert "continuing" not in proc.stdout and str(tmp_path / "runs" / "demo-2") in proc.stdout


def test_the_demo_defaults_to_the_shipped_sample_and_its_tokenizer(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    bin_dir, log = stub_bin(tmp_path)
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", str(DEMO)], env={**env, "BIN": str(bin_dir),
                                                    "DEMO_OUT": str(out)},
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
    assert [c[1] for c in calls if c[0] == "bertforge"][0] == "prepare"  # no training
    assert calls[0][2] == "data/enwiki-2015-sample.txt.xz"
    assert (out / "tokenizer" / "vocab.txt").read_text().splitlines()[:5] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "8192 tokens" in proc.stdout
    pretrain = next(c for c in calls if c[1:2] == ["pretrain"])
    assert pretrain[pretrain.index("--max-steps") + 1] == "3000"
    assert pretrain[pretrain.index("--warmup-steps") + 1] == "150"


def test_demo_uses_an_empty_output_directory(tmp_path, home_corpus):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    proc, calls = run_demo(tmp_path, str(home_corpus), tmp_path / "runs" / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "kept" not in proc.stdout
    assert calls[0][calls[0].index("--out") + 1] == str(tmp_path / "runs" / "demo" / "tokenizer")


# ------------------------------------------------------------------------ the bare command

def test_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"bertforge {__version__}", err


def test_bare_command_prints_the_help(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and not err
    assert out.startswith("usage: bertforge") and "pretrain" in out and "fill-mask" in out


# ------------------------------------------------------------- failures leave no --out dir

@pytest.mark.parametrize("argv, match", [
    (["pretrain", "--corpus", "{tmp}/missing.txt", "--out", "{out}", "--max-steps", "1"],
     "corpus path not found"),
    (["pretrain", "--corpus", "{tmp}/*.nothing", "--out", "{out}", "--max-steps", "1"],
     "no corpus files match"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--preset", "tiny",
      "--vocab-size", "200", "--seq-len", "32", "--max-position-embeddings", "64"],
     "give --max-steps or --time-budget"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--preset", "tiny",
      "--seq-len", "32", "--max-position-embeddings", "64"],
     "give --max-steps or --time-budget"),
    (["pretrain", "--corpus", "{empty}", "--out", "{out}", "--max-steps", "1"], "no documents"),
    (["pretrain", "--data", "{tmp}/no-data", "--out", "{out}", "--max-steps", "1"],
     "data directory not found"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--preset", "tiny", "--seq-len", "64",
      "--max-steps", "1"], "seq_len"),
    (["tokenizer", "{tmp}/missing.txt", "--out", "{out}"], "corpus path not found"),
    (["tokenizer", "{tmp}/*.nothing", "--out", "{out}"], "no corpus files match"),
    (["tokenizer", "{empty}", "--out", "{out}", "--quiet"], "no documents"),
    (["prepare", "{tmp}/missing.txt", "--tokenizer", "{tok}", "--out", "{out}"],
     "corpus path not found"),
    (["prepare", "{empty}", "--tokenizer", "{tok}", "--out", "{out}", "--quiet"],
     "no documents"),
    (["prepare", "{corpus}", "--tokenizer", "{tmp}/no-tok", "--out", "{out}"],
     "tokenizer directory not found"),
])
def test_a_failed_command_leaves_no_out_directory(capsys, tmp_path, corpus_file, tokenizer_dir,
                                                  data_dir, argv, match):
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "new" / "out"  # its parent is new too: neither may be left behind
    subs = {"tmp": tmp_path, "out": out, "corpus": corpus_file, "tok": tokenizer_dir,
            "data": data_dir, "empty": tmp_path / "empty.txt"}
    code, _, err = run_cli(capsys, *(a.format(**subs) for a in argv))
    assert code == 2
    assert match in one_line_error(err)
    assert not out.exists() and not out.parent.exists()


# ------------------------------------------------------ config.yaml records what was run

@pytest.fixture(scope="module")
def data_02(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    from bertforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("data02") / "data"
    prepare([str(corpus_file)], tokenizer_dir, out, seq_len=32, valid_fraction=0.2,
            show_progress=False)
    return out


def tiny_pretrain(capsys, data: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "pretrain", "--data", data, "--out", run, "--preset", "tiny",
                   "--max-position-embeddings", "64", "--seq-len", "32", "--batch-size", "8",
                   "--max-steps", "3", "--quiet", *extra)


def test_config_records_the_valid_fraction_the_data_was_prepared_with(capsys, tmp_path,
                                                                       data_02):
    code, _, err = tiny_pretrain(capsys, data_02, tmp_path / "run")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["valid_fraction"] == 0.2


def test_a_typed_valid_fraction_the_data_contradicts_is_refused(capsys, tmp_path, data_02):
    code, _, err = tiny_pretrain(capsys, data_02, tmp_path / "run", "--valid-fraction", "0.05")
    assert code == 2
    assert "prepared with valid_fraction 0.2" in one_line_error(err)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- file modes

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def tiny_model(tokenizer_dir: Path):
    from bertforge.config import ModelConfig
    from bertforge.model.bert import BertForPreTraining

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    return BertForPreTraining(ModelConfig(vocab_size=len(vocab), **TINY)).eval()


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
    path = save_checkpoint(tmp_path / "checkpoints", 1, model_state(model),
                           optimizer.state_dict(), {"step": 1})
    found = modes(path)
    assert "model.safetensors" in found and "state.json" in found
    assert found == {name: 0o644 for name in found}


# ---------------------------------------------------------------------------- fill-mask

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from bertforge.hf import export_model

    return export_model(tiny_model(tokenizer_dir), tmp_path_factory.mktemp("fill") / "hf",
                        tokenizer_dir=tokenizer_dir)


def test_fill_mask_echoes_the_text_and_numbers_its_masks(capsys, hf_dir):
    code, out, err = run_cli(capsys, "fill-mask", hf_dir, "the small [MASK] sees the [MASK].",
                             "--top-k", "2")
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


def test_help_shows_an_example_and_finetune_help_reads(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "example:" in out and "bertforge pretrain --corpus" in out
    code, out, _ = run_cli(capsys, "finetune", "--help")
    out = " ".join(out.split())
    assert "fraction of the training steps (unless --warmup-steps is given). (default: 0.1)" in out
    assert "0.06 when" not in out


def test_fill_mask_json_names_each_mask(capsys, hf_dir):
    code, out, _ = run_cli(capsys, "fill-mask", hf_dir, "the [MASK] sees the [MASK].", "--json",
                           "--top-k", "1")
    results = json.loads(out)
    assert code == 0 and [r["mask_index"] for r in results] == [0, 1]
    assert [r["position"] for r in results] == [2, 5]  # tokens from [CLS] at 0
    assert all(len(r["predictions"]) == 1 for r in results)


def test_fill_mask_refuses_a_top_k_below_one(capsys, hf_dir):
    code, _, err = run_cli(capsys, "fill-mask", hf_dir, "the [MASK].", "--top-k", "0")
    assert code == 2 and "--top-k: '0': must be >= 1" in one_line_error(err)
