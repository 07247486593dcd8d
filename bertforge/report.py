"""Run reports: PNG plots of a run's metrics.jsonl and a report.md summary, in RUN_DIR/report/.

Works for pretraining runs (training loss, held-out MLM loss and accuracy, learning
rate, tokens/s) and fine-tuning outputs alike (their eval lines hold the task's metrics
instead). Plots use matplotlib's object-oriented API on the Agg canvas: no display, no
pyplot global state, safe at the end of a run on a headless machine. matplotlib is an
optional dependency (`pip install 'bertforge[report]'`); without it, BertforgeError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bertforge import rundir
from bertforge.errors import BertforgeError

REPORT = "report"
# Eval-line fields that are bookkeeping, not metrics (perplexity is exp(mlm_loss)).
_NOT_PLOTTED = {"kind", "step", "tokens", "elapsed_s", "epoch", "masked_tokens", "perplexity",
                "nsp_pairs", "sop_pairs"}


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, eval lines) of RUN_DIR/metrics.jsonl; a line cut short is skipped."""
    path = Path(run_dir) / rundir.METRICS
    if not path.is_file():
        raise BertforgeError(f"{run_dir}: no {rundir.METRICS} (not a bertforge run, or it "
                             f"has not logged a step yet)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "eval":
            evals.append(record)
    if not train:
        raise BertforgeError(f"{path}: no training steps logged yet")
    return train, evals


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(path: Path, panels: list[tuple[str, list[tuple[str, list, list, str]]]]) -> None:
    """One PNG with a panel per (title, [(label, steps, values, style)]), stacked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for label, xs, ys, style in lines:
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        if i == len(panels) - 1:
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _eval_keys(evals: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for record in evals:
        keys += [k for k, v in record.items() if k not in _NOT_PLOTTED and k not in keys
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write loss.png, eval.png, lr.png, throughput.png and report.md; returns the folder."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BertforgeError("plots need matplotlib: pip install 'bertforge[report]'") from None
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else run_dir / REPORT
    out.mkdir(parents=True, exist_ok=True)
    held_out_loss = next((k for k in ("mlm_loss", "eval_loss") if _series(evals, k)[0]), None)

    # With NSP/SOP the training loss is a sum of terms: compare MLM with MLM.
    train_loss = "mlm_loss" if _series(train, "mlm_loss")[0] else "loss"
    loss_lines = [(f"training ({train_loss})", *_series(train, train_loss), "-")]
    if held_out_loss:
        loss_lines.append((f"held-out ({held_out_loss})", *_series(evals, held_out_loss), "o-"))
    plots = {"loss.png": [("loss", loss_lines)],
             "lr.png": [("learning rate", [("lr", *_series(train, "lr"), "-")])],
             "throughput.png": [("training tokens/s", [("tokens/s",
                                                        *_series(train, "tokens_per_s"), "-")])]}
    if evals and _eval_keys(evals):
        plots["eval.png"] = [(k, [(k, *_series(evals, k), "o-")]) for k in _eval_keys(evals)]
    for name, panels in plots.items():
        _plot(out / name, panels)
    (out / "report.md").write_text(_markdown(run_dir, train, evals, list(plots)))
    return out


def _config_text(run_dir: Path) -> tuple[str, str]:
    if (run_dir / rundir.CONFIG).is_file():
        return "yaml", (run_dir / rundir.CONFIG).read_text()
    spec = run_dir / "finetune.json"  # a fine-tuning output directory
    if spec.is_file():
        return "json", spec.read_text()
    return "", "(no config.yaml in this directory)\n"


def _markdown(run_dir: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]],
              plots: list[str]) -> str:
    last = train[-1]
    losses = [r["loss"] for r in train[-10:] if isinstance(r.get("loss"), (int, float))]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    rows = [("steps", f"{last['step']:,}"), ("tokens", f"{last.get('tokens', 0):,}"),
            ("training time", f"{last.get('elapsed_s', 0) / 60:.1f} min")]
    if "epoch" in last:
        rows.append(("epochs", f"{last['epoch']:.2f}"))
    if losses:
        rows.append(("final training loss (mean of the last logged steps)",
                     f"{sum(losses) / len(losses):.4f}"))
    if speeds:
        rows.append(("median tokens/s", f"{speeds[len(speeds) // 2]:,.0f}"))
    if evals:
        final = evals[-1]
        for key in _eval_keys(evals) + (["perplexity"] if "perplexity" in final else []):
            if isinstance(final.get(key), (int, float)):
                rows.append((f"held-out {key} (step {final['step']:,})", f"{final[key]:.4f}"))
    lang, config = _config_text(run_dir)
    lines = [f"# Run report: {run_dir.resolve().name}", "", "| | |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    lines += ["", "## Config", "", f"```{lang}", config.rstrip(), "```", ""]
    return "\n".join(lines)
