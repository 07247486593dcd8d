"""benchmarks/gpu_check.py in smoke mode: every step of the GPU run, at tiny sizes, here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
                           "--data", str(tmp_path / "no-data")],  # synthetic data
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["env", "tests", "bench-tiny-8x64", "profile", "pretrain", "glue"]
    assert all(step["ok"] for step in steps.values()), steps
    assert steps["bench-tiny-8x64"]["result"]["speedup"] > 0
    assert steps["pretrain"]["result"]["evaluate"]["unigram_baseline_loss"] > 0
    assert set(steps["glue"]["result"]) == {"pretrained", "from_scratch"}
    table = proc.stdout.strip().splitlines()
    assert table[-1].startswith("  glue from_scratch: sst2 ") and "| tiny-8x64 |" in proc.stdout
    assert (out / "log.txt").read_text().count("$ -m bertforge") >= 5


def test_gpu_check_refuses_to_run_without_data_on_a_gpu_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"),
                           "--data", str(tmp_path / "no-data")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--stage" in proc.stderr
