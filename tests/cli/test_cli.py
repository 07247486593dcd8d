"""The command line: error cases end in one line and exit 2; the stages chain."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import one_line_error, run_cli

from bertforge import __version__
from bertforge.cli.options import parse_duration


@pytest.mark.parametrize(
    "argv, match",
    [
        (["pretrain", "--corpus", "no/such/file.txt", "--out", "{tmp}/r"], "no/such/file.txt"),
        (["pretrain", "--corpus", "{empty}", "--out", "{tmp}/r"], "no documents"),
        (
            ["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--preset", "huge"],
            "unknown preset 'huge'",
        ),
        (
            (
                "pretrain --corpus {corpus} --out {tmp}/r --hidden-size 100 --num-attention-heads 3"
            ).split(),
            "divisible by num_attention_heads",
        ),
        (["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--lr", "-1"], "lr"),
        (
            ["pretrain", "--corpus", "{corpus}", "--out", "{tmp}/r", "--time-budget", "soon"],
            "invalid duration",
        ),
        (["evaluate", "{tmp}/nope"], "run directory not found"),
        (["export", "{tmp}/nope", "--out", "{tmp}/hf"], "run directory not found"),
        (["tokenizer", "{tmp}/missing.txt", "--out", "{tmp}/tok"], "missing.txt"),
        (["fill-mask", "{tmp}/nope", "a [MASK] b"], "not found"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, tmp_path, corpus_file, argv, match):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    subs = {"tmp": str(tmp_path), "corpus": str(corpus_file), "empty": str(tmp_path / "empty.txt")}
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
    assert (
        run_cli(
            capsys, "tokenizer", str(corpus_file), "--out", tok, "--vocab-size", "200", "--quiet"
        )[0]
        == 0
    )
    assert (
        run_cli(
            capsys,
            "prepare",
            str(corpus_file),
            "--tokenizer",
            tok,
            "--out",
            data,
            "--seq-len",
            "32",
            "--valid-fraction",
            "0.05",
            "--quiet",
        )[0]
        == 0
    )
    code, out, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "5",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["step"] == 5
    code, out, _ = run_cli(capsys, "evaluate", run)
    first = json.loads(out)
    assert {"mlm_loss", "mlm_accuracy", "perplexity", "unigram_baseline_loss"} <= set(first)
    assert json.loads(run_cli(capsys, "evaluate", run)[1]) == first  # fixed masking seed
    assert run_cli(capsys, "export", run, "--out", hf)[0] == 0
    code, out, _ = run_cli(
        capsys, "fill-mask", hf, "the small [MASK] sees the dog.", "--json", "--top-k", "3"
    )
    preds = json.loads(out)[0]["predictions"]
    assert len(preds) == 3 and all(0 <= p["score"] <= 1 for p in preds)
    # a second pretrain into the same directory without --resume is refused
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "5",
        "--quiet",
    )
    assert code == 2 and "--resume" in one_line_error(err)


def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bertforge", "evaluate", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert one_line_error(proc.stderr).startswith("bertforge: error:")


# Every flag of every command: the README's examples and users' scripts rely on them.
FLAGS = {
    "bench": """--batch-size --compile --device --dropout --json --preset --seq-len --steps
        --vocab-size --vs-hf --warmup""",
    "evaluate": """--checkpoint --data --device --max-sequences --out --precision --split""",
    "export": """--out""",
    "fill-mask": """--json --top-k""",
    "finetune": """--batch-size --data-dir --device --dropout --epochs --eval-batch-size
        --from-scratch --grad-clip --keep-last --label-column --length-grouping
        --log-every --lr --max-length --max-steps --max-train-examples
        --micro-batch-size --out --precision --quiet --regression --resume --seed
        --task --text-column --text-pair-column --train --validation --warmup-fraction
        --warmup-steps --weight-decay""",
    "glue": """--batch-size --data-dir --device --dropout --epochs --eval-batch-size
        --from-scratch --grad-clip --json --keep-last --length-grouping --log-every
        --lr --max-length --max-steps --max-train-examples --micro-batch-size --out
        --precision --quiet --results --seed --tasks --warmup-fraction --warmup-steps
        --weight-decay""",
    "predict": """--batch-size --device --input --max-length --no-text --output --quiet
        --text-column --text-pair-column""",
    "prepare": """--dedup --document-boundary --num-shards --one-doc-per-line --out --quiet
        --seq-len --shard-index --text-column --text-field --tokenizer
        --valid-fraction --workers""",
    "pretrain": """--adam-beta1 --adam-beta2 --adam-eps --batch-size --cased --checkpoint-every
        --compile --config --corpus --data --dedup --device --document-boundary
        --dropout --eval-every --eval-sequences --grad-clip --hidden-size
        --intermediate-size --keep-last --log-every --lr --mask-rate
        --mask-token-ratio --masking --max-position-embeddings --max-steps
        --micro-batch-size --num-attention-heads --num-hidden-layers --objective
        --on-nan --one-doc-per-line --out --precision --preset --quiet
        --random-token-ratio --resume --sample-bytes --schedule --seed --seq-len
        --span-max --span-p --strategy --text-column --text-field --time-budget
        --valid-fraction --vocab-size --warmup-fraction --warmup-steps --weight-decay""",
    "report": """--out""",
    "tokenizer": """--cased --dedup --min-frequency --one-doc-per-line --out --quiet
        --sample-bytes --text-column --text-field --vocab-size""",
}


def _flags(command: str) -> set[str]:
    import argparse

    from bertforge.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_flag_is_still_there(command):
    assert set(FLAGS[command].split()) <= _flags(command)


def test_log_every_zero_is_refused_before_any_work(tmp_path, data_dir, capsys):
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
        "2",
        "--log-every",
        "0",
    )
    assert code == 2
    assert err.strip() == "bertforge pretrain: error: argument --log-every: '0': must be >= 1"
    assert not (tmp_path / "run").exists()


def test_bench_json_rows(capsys):
    import json

    from bertforge.train.runtime import resolve_precision

    code, out, err = run_cli(
        capsys,
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--vocab-size",
        "500",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--vs-hf",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    bf16 = resolve_precision("auto", __import__("torch").device("cpu")) is not None
    names = [r["name"] for r in result["bertforge"] + result["transformers"]]
    expected = ["bertforge (bf16)", "bertforge (fp32)"] if bf16 else ["bertforge (fp32)"]
    expected += [
        f"transformers ({a}, {p})"
        for a in ("eager", "sdpa")
        for p in (["bf16", "fp32"] if bf16 else ["fp32"])
    ]
    assert names == expected
    assert result["speedup"] > 0 and all(0 < r["mfu"] for r in result["bertforge"])
    code, out, _ = run_cli(
        capsys,
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--vocab-size",
        "500",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--no-fp32",
        "--json",
    )
    assert [r["name"] for r in json.loads(out)["bertforge"]] == [expected[0]]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "glue"])
def test_warmup_is_spelled_one_way(command):
    # --warmup-steps or --warmup-fraction; `bench --warmup` is its untimed steps.
    assert "--warmup" not in _flags(command)


# ------------------------------------------------------------------------ the bare command


def test_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"bertforge {__version__}", err


def test_bare_command_prints_the_help(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and not err
    assert out.startswith("usage: bertforge") and "pretrain" in out and "fill-mask" in out


def test_help_shows_an_example_and_finetune_help_reads(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "example:" in out and "bertforge pretrain --corpus" in out
    code, out, _ = run_cli(capsys, "finetune", "--help")
    out = " ".join(out.split())
    assert "fraction of the training steps (unless --warmup-steps is given). (default: 0.1)" in out
    assert "0.06 when" not in out


# ------------------------------------------------------------- failures leave no --out dir


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["pretrain", "--corpus", "{tmp}/missing.txt", "--out", "{out}", "--max-steps", "1"],
            "corpus path not found",
        ),
        (
            ["pretrain", "--corpus", "{tmp}/*.nothing", "--out", "{out}", "--max-steps", "1"],
            "no corpus files match",
        ),
        (
            (
                "pretrain --corpus {corpus} --out {out} --preset tiny --vocab-size 200 "
                "--seq-len 32 --max-position-embeddings 64"
            ).split(),
            "give --max-steps or --time-budget",
        ),
        (
            (
                "pretrain --data {data} --out {out} --preset tiny --seq-len 32 "
                "--max-position-embeddings 64"
            ).split(),
            "give --max-steps or --time-budget",
        ),
        (["pretrain", "--corpus", "{empty}", "--out", "{out}", "--max-steps", "1"], "no documents"),
        (
            ["pretrain", "--data", "{tmp}/no-data", "--out", "{out}", "--max-steps", "1"],
            "data directory not found",
        ),
        (
            "pretrain --data {data} --out {out} --preset tiny --seq-len 64 --max-steps 1".split(),
            "seq_len",
        ),
        (["tokenizer", "{tmp}/missing.txt", "--out", "{out}"], "corpus path not found"),
        (["tokenizer", "{tmp}/*.nothing", "--out", "{out}"], "no corpus files match"),
        (["tokenizer", "{empty}", "--out", "{out}", "--quiet"], "no documents"),
        (
            ["prepare", "{tmp}/missing.txt", "--tokenizer", "{tok}", "--out", "{out}"],
            "corpus path not found",
        ),
        (
            ["prepare", "{empty}", "--tokenizer", "{tok}", "--out", "{out}", "--quiet"],
            "no documents",
        ),
        (
            ["prepare", "{corpus}", "--tokenizer", "{tmp}/no-tok", "--out", "{out}"],
            "tokenizer directory not found",
        ),
    ],
)
def test_a_failed_command_leaves_no_out_directory(
    capsys, tmp_path, corpus_file, tokenizer_dir, data_dir, argv, match
):
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "new" / "out"  # its parent is new too: neither may be left behind
    subs = {
        "tmp": tmp_path,
        "out": out,
        "corpus": corpus_file,
        "tok": tokenizer_dir,
        "data": data_dir,
        "empty": tmp_path / "empty.txt",
    }
    code, _, err = run_cli(capsys, *(a.format(**subs) for a in argv))
    assert code == 2
    assert match in one_line_error(err)
    assert not out.exists() and not out.parent.exists()
