"""Run reports: pretraining writes plots and report.md; `bertforge report` rewrites them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertforge.cli.main import main
from bertforge.commands.report import build_figure, write_report
from bertforge.config import DataConfig, RunConfig, TrainConfig, preset
from bertforge.errors import BertforgeError

pytestmark = pytest.mark.report  # these tests read the reports runs write

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    from bertforge.commands.pretrain import run_pretrain

    model = preset(
        "tiny",
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    cfg = RunConfig(
        model=model,
        data=DataConfig(seq_len=32),
        train=TrainConfig(
            batch_size=8,
            micro_batch_size=8,
            max_steps=4,
            log_every=1,
            eval_every=2,
            eval_sequences=16,
            precision="fp32",
        ),
    )
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
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name != ".bertforge") == [
        "eval.png",
        "loss.png",
        "lr.png",
        "report.md",
        "throughput.png",
    ]


def test_report_skips_lines_cut_short_and_needs_metrics(tmp_path):
    with pytest.raises(BertforgeError, match=r"no metrics.jsonl"):
        write_report(tmp_path)
    lines = [
        {
            "kind": "train",
            "step": s,
            "loss": 5.0 - s,
            "lr": 1e-4,
            "tokens": 64 * s,
            "tokens_per_s": 1000.0,
            "elapsed_s": float(s),
        }
        for s in range(1, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "tra'
    )  # killed mid-write
    out = write_report(tmp_path)
    assert not (out / "eval.png").exists()  # no eval lines, no eval plot
    assert (out / "loss.png").stat().st_size > 1000
    assert "(no config.yaml in this directory)" in (out / "report.md").read_text()


def test_report_error_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, data_dir) -> Path:
    """5 steps logged every 2: the last training line is step 4, the final evaluation step 5."""
    from conftest import tiny_run_config

    from bertforge.commands.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("report-odd") / "run"
    run_pretrain(
        out,
        tiny_run_config(
            batch_size=8,
            micro_batch_size=8,
            max_steps=5,
            log_every=2,
            eval_every=0,
            eval_sequences=16,
        ),
        data_dir=data_dir,
        show_progress=False,
    )
    return out


def test_report_names_the_step_of_each_figure(odd_run):
    text = (odd_run / "report" / "report.md").read_text()
    assert text.startswith(
        "# bertforge pretraining run `run`: 2 layers, hidden 64, 2 heads, "
        "mlm on sequences of 32 tokens\n"
    )
    assert "| steps | 5 |" in text  # the run's last step, not the last logged one (4)
    assert "| tokens trained on (step 5) | 1,280 |" in text
    assert "| training time (step 5) |" in text
    assert "| training loss (mean of logged steps 1-4) |" in text
    assert "| held-out mlm_loss (step 5) |" in text


def test_report_sets_the_held_out_loss_against_the_unigram_baseline(odd_run):
    from bertforge.commands.evaluate import evaluate_run

    baseline = evaluate_run(odd_run)["unigram_baseline_loss"]  # the same masked tokens
    text = (odd_run / "report" / "report.md").read_text()
    assert (
        f"| held-out unigram-frequency baseline (the same masked tokens) | {baseline:.4f} |" in text
    )
    assert "nats per masked token" in text


def test_every_plot_says_what_its_y_axis_measures(odd_run, tmp_path, monkeypatch):
    from bertforge.commands import report
    from bertforge.commands.evaluate import evaluate_run

    figures = []
    monkeypatch.setattr(
        report, "build_figure", lambda panels: figures.append(build_figure(panels)) or figures[-1]
    )
    write_report(odd_run, tmp_path / "r")
    labels = {ax.get_title(): ax.get_ylabel() for fig in figures for ax in fig.axes}
    assert labels == {
        "training and held-out MLM loss": "loss (nats per masked token)",
        "learning rate": "learning rate",
        "training throughput": "tokens/s",
        "held-out MLM loss": "loss (nats per masked token)",
        "held-out MLM accuracy (masked tokens predicted exactly)": "accuracy (fraction correct)",
    }
    baseline = evaluate_run(odd_run)["unigram_baseline_loss"]
    for fig in figures:  # a horizontal line at the baseline on both held-out loss plots
        for ax in fig.axes:
            lines = [ln for ln in ax.get_lines() if ln.get_label() == "unigram-frequency baseline"]
            if ax.get_title() in ("training and held-out MLM loss", "held-out MLM loss"):
                assert len(lines) == 1 and set(lines[0].get_ydata()) == {baseline}
            else:
                assert not lines


def test_fine_tuning_report_labels(tmp_path, monkeypatch):
    from bertforge.commands import report

    lines = [
        {
            "kind": "train",
            "step": s,
            "loss": 0.7,
            "lr": 1e-4,
            "tokens": 64 * s,
            "tokens_per_s": 1000.0,
            "elapsed_s": float(s),
            "epoch": s / 4,
        }
        for s in (1, 2)
    ]
    lines.append(
        {
            "kind": "eval",
            "step": 2,
            "tokens": 128,
            "elapsed_s": 2.0,
            "epoch": 0.5,
            "accuracy": 0.5,
            "f1": 0.4,
            "eval_loss": 0.69,
            "score": 0.5,
        }
    )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "finetune.json").write_text(
        json.dumps({"task": "sst2", "model": "runs/demo", "regression": False})
    )
    figures = []
    monkeypatch.setattr(
        report, "build_figure", lambda panels: figures.append(build_figure(panels)) or figures[-1]
    )
    out = write_report(tmp_path)
    labels = {ax.get_title(): ax.get_ylabel() for fig in figures for ax in fig.axes}
    assert labels["training and held-out loss"] == "loss (nats per example)"
    assert labels["held-out loss"] == "loss (nats per example)"
    assert labels["held-out accuracy"] == "accuracy (fraction correct)"
    assert labels["held-out F1"] == "f1"
    text = (out / "report.md").read_text()
    assert text.startswith(f"# bertforge fine-tuning run `{tmp_path.name}`: sst2 from runs/demo")
    assert "unigram" not in text


def test_plot_ranges_are_set_by_the_curve_not_by_step_one_or_noise():
    from bertforge.commands.report import robust_range

    # Step 1's loss of 10.4 does not set the range: the plateau and the fall below it do.
    losses = [10.4, 9.1, 8.0] + [7.5 - 0.001 * i for i in range(40)]
    low, high = robust_range(losses, keep=[7.2, 7.21])
    assert high < 8.0 and low < 7.2
    # A flat accuracy of 0.074-0.080 is shown over at least 0.1, not magnified.
    low, high = robust_range([0.074, 0.08, 0.077], min_span=0.1)
    assert high - low >= 0.1 and low < 0.074 and high > 0.08


def test_a_time_budget_runs_lr_plot_says_it_follows_training_time(tmp_path):
    from bertforge.commands.report import plot_panels
    from bertforge.config import RunConfig, TrainConfig

    RunConfig(train=TrainConfig(time_budget=600.0)).save(tmp_path / "config.yaml")
    train = [
        {"kind": "train", "step": s, "loss": 7.0, "lr": 1e-3, "tokens_per_s": 1.0} for s in (1, 2)
    ]
    title = plot_panels(tmp_path, train, [])["lr.png"][0].title
    assert "follows training time" in title and "10-minute budget" in title
