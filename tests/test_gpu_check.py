"""benchmarks/gpu_check.py: the stages' order, the results written after each, a missing
pytest and a failing compiled row (faked commands, in seconds); and in smoke mode every
stage of the GPU run, at tiny sizes, here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
GPU_ORDER = (
    "env tests bench-mini-256x128 bench-base-256x128 bench-base-32x512 profile pretrain "
    "glue-pretrained glue-from_scratch bench-base-256x128-compiled "
    "bench-base-256x128-hf-compiled"
).split()


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(self, *args: str) -> str:
    """What each command of a GPU run prints last; the compiled bertforge row times out."""
    if "--inner" in args:
        if args[args.index("--inner") + 1] == "env":
            return json.dumps(
                {
                    "torch": "2.13",
                    "device": "cuda:0",
                    "dtype": "torch.bfloat16",
                    "matmul_peak_tflops": 700.0,
                    "transformers": "5.0",
                }
            )
        return json.dumps(
            [{"share": 0.5, "ms_per_step": 1.0, "calls_per_step": 2, "name": "aten::mm"}]
        )
    command = args[2]  # -m bertforge COMMAND
    if command == "bench":
        if "--compile" in args:
            raise TimeoutError("stopped at its cap of 70s")
        return json.dumps(
            {
                "best": {"name": "bertforge (bf16)", "tokens_per_s": 100.0, "mfu": 0.5},
                "best_transformers": {"name": "transformers (sdpa, bf16)", "tokens_per_s": 50.0},
                "speedup": 2.0,
            }
        )
    if command == "pretrain":
        run = Path(args[args.index("--out") + 1])
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}\n")
        (run / "metrics.jsonl").write_text(
            json.dumps({"kind": "train", "tokens_per_s": 9.0}) + "\n"
        )
        return json.dumps({"step": 10, "tokens": 1000, "elapsed_s": 1.0})
    if command == "evaluate":
        return json.dumps({"mlm_loss": 5.0, "unigram_baseline_loss": 7.0})
    assert command == "glue", args
    return json.dumps({"tasks": {"sst2": {"score": 0.8}, "cola": {"score": 0.1}}})


def test_stages_run_in_order_and_each_is_saved_as_it_ends(tmp_path, monkeypatch, capsys):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "has_module", lambda name: name != "pytest")
    monkeypatch.setattr(gc.Check, "run", _fake_run)
    saved = []
    real_save = gc.Check.save

    def save(self):
        real_save(self)
        saved.append(json.loads((self.out / "results.json").read_text()))

    monkeypatch.setattr(gc.Check, "save", save)
    data = tmp_path / "data"
    (data / "enwiki").mkdir(parents=True)
    (data / "glue").mkdir()
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(out), "--data", str(data)])
    assert gc.main() == 1  # the compiled row failed
    # results.json after every stage, each time with the stages so far
    assert [list(s["steps"]) for s in saved[: len(GPU_ORDER)]] == [
        GPU_ORDER[: i + 1] for i in range(len(GPU_ORDER))
    ]
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert list(steps) == GPU_ORDER
    assert "pytest is not installed" in steps["tests"]["skipped"]
    assert "pip download" in steps["tests"]["skipped"] and not steps["tests"]["ok"]
    assert steps["bench-base-256x128"]["ok"]  # kept, whatever the compiled row did
    assert steps["bench-base-256x128-compiled"]["error"].startswith("TimeoutError")
    assert steps["bench-base-256x128-hf-compiled"]["ok"]
    assert steps["glue-from_scratch"]["result"]["tasks"]["sst2"]["score"] == 0.8
    table = capsys.readouterr().out
    assert "| base-256x128-compiled | TimeoutError: stopped at its cap" in table
    assert "tests: pytest is not installed" in table


def test_stage_caps_fit_the_budget(tmp_path):
    """The caps of every stage but the compiled rows (which take what is left) fit in the
    default budget, which leaves a 10-minute command time to start and copy."""
    gc = _gpu_check()
    rows = len([r for r in gc.BENCH_GPU if r[4] == "eager"])
    before_compiled = (
        sum(gc.CAPS[k] for k in ("env", "tests", "profile", "pretrain"))
        + rows * gc.CAPS["bench"]
        + 2 * gc.CAPS["glue"]
    )
    assert before_compiled + gc.CAPS["compiled"] <= gc.DEFAULT_BUDGET <= 540


def test_stage_data_copies_what_the_run_reads(tmp_path):
    source = tmp_path / "shared"
    (source / "enwiki-2015-wikiextractor-sample" / "AA").mkdir(parents=True)
    (source / "enwiki-2015-wikiextractor-sample" / "AA" / "wiki_00").write_text("text\n")
    for task in ("SST-2", "CoLA"):
        (source / "glue" / task).mkdir(parents=True)
        (source / "glue" / task / "train.tsv").write_text("x\n")
    target = tmp_path / "benchmarks-data"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage-data", str(target), "--from", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (target / "enwiki" / "AA" / "wiki_00").is_file()
    assert (target / "glue" / "SST-2" / "train.tsv").is_file()
    assert (target / "glue" / "CoLA" / "train.tsv").is_file()


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--out",
            str(out),
            "--data",
            str(tmp_path / "no-data"),
        ],  # synthetic data
        capture_output=True,
        text=True,
        timeout=1200,
    )
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert (
        list(steps)
        == ("env tests bench-tiny-8x64 profile pretrain glue-pretrained glue-from_scratch").split()
    )
    assert all(step["ok"] for step in steps.values()), steps
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert steps["bench-tiny-8x64"]["result"]["speedup"] > 0
    assert steps["pretrain"]["result"]["evaluate"]["unigram_baseline_loss"] > 0
    table = proc.stdout.strip().splitlines()
    assert table[-1].startswith("  glue from_scratch: sst2 ") and "| tiny-8x64 |" in proc.stdout
    assert (out / "log.txt").read_text().count("$ -m bertforge") >= 5


def test_gpu_check_refuses_to_run_without_data_on_a_gpu_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(tmp_path / "out"),
            "--data",
            str(tmp_path / "no-data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--stage-data" in proc.stderr
