"""Run reports: pretraining writes plots and report.md; `bertforge report` rewrites them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertforge.cli import main
from bertforge.config import DataConfig, RunConfig, TrainConfig, preset
from bertforge.errors import BertforgeError
from bertforge.report import write_report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    from bertforge.pretrain import run_pretrain

    model = preset("tiny", hidden_size=64, num_attention_heads=2, intermediate_size=128,
                   max_position_embeddings=64)
    cfg = RunConfig(model=model, data=DataConfig(seq_len=32),
                    train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=4, log_every=1,
                                      eval_every=2, eval_sequences=16, precision="fp32"))
    out = tmp_path_factory.mktemp("report") / "run"
    run_pretrain(out, cfg, data_dir=data_dir, show_progress=False)
    return out


def test_pretrain_writes_the_report(run):
    report = run / "report"
    for name in ("loss.png", "eval.png", "lr.png", "throughput.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    text = (report / "report.md").read_text()
    assert "| steps | 4 |" in text and "held-out mlm_loss (step 4)" in text
    assert "held-out mlm_accuracy" in text and "![loss](loss.png)" in text
    assert "hidden_size: 64" in text  # the config


def test_report_command(tmp_path, run, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "eval.png", "loss.png", "lr.png", "report.md", "throughput.png"]


def test_report_skips_lines_cut_short_and_needs_metrics(tmp_path):
    with pytest.raises(BertforgeError, match="no metrics.jsonl"):
        write_report(tmp_path)
    lines = [{"kind": "train", "step": s, "loss": 5.0 - s, "lr": 1e-4, "tokens": 64 * s,
              "tokens_per_s": 1000.0, "elapsed_s": float(s)} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "tra')  # killed mid-write
    out = write_report(tmp_path)
    assert not (out / "eval.png").exists()  # no eval lines, no eval plot
    assert (out / "loss.png").stat().st_size > 1000
    assert "(no config.yaml in this directory)" in (out / "report.md").read_text()


def test_report_error_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err
