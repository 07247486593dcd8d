"""Run reports: PNG plots of a run's metrics.jsonl and a report.md summary, in RUN_DIR/report/.

Works for pretraining runs and fine-tuning outputs alike (their eval lines hold the task's
metrics). Every figure in report.md names the step it is from, and every plot's y axis
says what it measures, in which unit. A pretraining run's held-out loss is set against the
unigram baseline (`bertforge.commands.evaluate.unigram_baseline`) on the same masked
tokens as the run's own evaluation, so report.md and `bertforge evaluate` agree. Plots use
matplotlib's object-oriented API on the Agg canvas (no display, no pyplot global state);
matplotlib is optional (`pip install 'bertforge[report]'`), and without it, BertforgeError.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge import rundir
from bertforge.config import PRESETS, RunConfig
from bertforge.errors import BertforgeError
from bertforge.fileio import make_dir, write_text_atomic
from bertforge.paths import replace_owned, require_owned, sibling

REPORT = "report"
# Eval-line fields that are bookkeeping, not metrics (perplexity is exp(mlm_loss)).
_NOT_PLOTTED = {
    "kind",
    "step",
    "tokens",
    "elapsed_s",
    "epoch",
    "masked_tokens",
    "perplexity",
    "nsp_pairs",
    "sop_pairs",
}


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, eval lines) of RUN_DIR/metrics.jsonl; a line cut short is skipped."""
    path = Path(run_dir) / rundir.METRICS
    if not path.is_file():
        raise BertforgeError(
            f"{run_dir}: no {rundir.METRICS} (not a bertforge run, or it has not logged a step yet)"
        )
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
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


# Titles in words for the metrics.jsonl fields a plot shows.
_TITLES = {
    "loss": "loss",
    "mlm_loss": "held-out MLM loss",
    "mlm_accuracy": "held-out MLM accuracy (masked tokens predicted exactly)",
    "nsp_loss": "held-out next-sentence loss",
    "sop_loss": "held-out sentence-order loss",
    "nsp_accuracy": "held-out next-sentence accuracy",
    "sop_accuracy": "held-out sentence-order accuracy",
    "eval_loss": "held-out loss",
    "accuracy": "held-out accuracy",
    "f1": "held-out F1",
    "matthews": "held-out Matthews correlation",
    "pearson": "held-out Pearson correlation",
    "spearman": "held-out Spearman correlation",
    "score": "held-out score",
}


def _title_of(key: str) -> str:
    """A metric's plot title in words ('held-out MLM loss'), not its field name."""
    base = key.split("/")[0]
    for name, title in _TITLES.items():
        if base == name:
            return title
        if base.startswith(name + "_"):  # eval_loss_matched, accuracy_mismatched, ...
            return f"{title} ({base[len(name) + 1 :]})"
    return "held-out " + key.replace("_", " ")


@dataclass
class Panel:
    """One plot against the step: lines of (label, steps, values, style), the y axis's
    label with its unit, horizontal reference lines (label, value), and the y range
    (None: matplotlib's own)."""

    title: str
    ylabel: str
    lines: list[tuple[str, list[int], list[float], str]]
    references: list[tuple[str, float]] = field(default_factory=list)
    ylim: tuple[float, float] | None = None


def robust_range(
    values: list[float], keep: list[float] | None = None, min_span: float = 0.0
) -> tuple[float, float] | None:
    """A y range for `values` that a few early outliers do not set: from the smallest value
    to the 98th percentile of the values after the first tenth (step 1's loss of ~10 would
    otherwise flatten the rest of the curve), widened to hold every value of `keep` (the
    held-out points, the baseline) and to at least `min_span` (so that a flat line is not
    magnified into noise), with a margin."""
    if not values:
        return None
    later = sorted(values[len(values) // 10 :]) or sorted(values)
    high = later[min(len(later) - 1, int(0.98 * len(later)))]
    low = min(values)
    for v in keep or []:
        low, high = min(low, v), max(high, v)
    if high - low < min_span:
        middle = (high + low) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def _min_span(key: str) -> float:
    """The smallest y range a metric is shown over: a flat accuracy stays flat."""
    if "accuracy" in key or key.startswith(("f1", "score", "matthews", "pearson", "spearman")):
        return 0.1
    return 0.5 if "loss" in key else 0.0


def build_figure(panels: list[Panel]) -> Any:
    """A matplotlib Figure (on the Agg canvas) with the panels stacked, sharing the x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for label, xs, ys, style in panel.lines:
            ax.plot(xs, ys, style, label=label, markersize=4)
        for label, value in panel.references:
            ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if len(panel.lines) + len(panel.references) > 1:
            ax.legend(fontsize=8)
        if i == len(panels) - 1:
            ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def _unit(key: str, kind: str) -> str:
    """The y-axis label of metric `key` (a metrics.jsonl field) of a `kind` run: what it
    measures and in which unit."""
    if key == "loss" or key.startswith("eval_loss"):
        return {
            "pretrain": "loss (nats per masked token)",
            "finetune": "loss (nats per example)",
            "finetune regression": "loss (mean squared error)",
        }.get(kind, "loss (nats)")
    if key.startswith("mse"):
        return "mean squared error"
    if key == "mlm_loss":
        return "loss (nats per masked token)"
    if key in ("nsp_loss", "sop_loss"):
        return "loss (nats per pair)"
    if "accuracy" in key:
        return "accuracy (fraction correct)"
    if key.startswith("score"):
        return "score (mean of the task's metrics)"
    return key  # a task metric (f1, matthews, pearson, ...): a score without a unit


def _kind(run_dir: Path) -> str:
    """'pretrain', 'finetune', 'finetune regression' or '' (neither file is there)."""
    if (run_dir / rundir.CONFIG).is_file():
        return "pretrain"
    spec = run_dir / "finetune.json"
    if spec.is_file():
        try:
            regression = bool(json.loads(spec.read_text()).get("regression"))
        except (ValueError, AttributeError):
            regression = False
        return "finetune regression" if regression else "finetune"
    return ""


def unigram_baseline_loss(run_dir: Path) -> float | None:
    """The unigram-frequency baseline's loss (nats per masked token) on the held-out
    masked tokens the run's evaluation scores (its first train.eval_sequences, the fixed
    evaluation masks), as `bertforge evaluate` reports it; None for a run that is not a
    pretraining run or whose data is not at hand."""
    from bertforge.commands.evaluate import unigram_baseline
    from bertforge.data.loader import ShardedSequences
    from bertforge.data.masking import build_masker

    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).is_file():
        return None
    try:
        cfg = RunConfig.load(run_dir / rundir.CONFIG)
        valid = ShardedSequences(cfg.data.path or run_dir / rundir.DATA, "valid")
        if len(valid) == 0:
            return None
        train = ShardedSequences(valid.data_dirs, "train")
        masker = build_masker(cfg.data, valid.data_dirs[0], valid.manifest, for_eval=True)
    except (BertforgeError, OSError, KeyError, ValueError):  # the data moved or is gone
        return None
    # Training frequencies are counted over at most unigram_baseline's default number of
    # training sequences, so a large corpus costs seconds here, as in `evaluate`.
    return unigram_baseline(train, valid, masker, cfg.train.eval_sequences)


def plot_panels(
    run_dir: Path,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    baseline: float | None = None,
) -> dict[str, list[Panel]]:
    """The panels of each PNG (file name -> panels); the unigram `baseline` is drawn on
    the held-out MLM loss."""
    kind = _kind(Path(run_dir))
    held_out_loss = next((k for k in ("mlm_loss", "eval_loss") if _series(evals, k)[0]), None)
    # With NSP/SOP the training loss is a sum of terms: compare MLM with MLM.
    train_loss = "mlm_loss" if _series(train, "mlm_loss")[0] else "loss"
    reference = (
        [("unigram-frequency baseline", baseline)]
        if baseline is not None and held_out_loss == "mlm_loss"
        else []
    )
    what = "MLM loss" if kind == "pretrain" or train_loss == "mlm_loss" else "loss"
    loss_lines = [(f"training {what}", *_series(train, train_loss), "-")]
    held_out: list[float] = []
    if held_out_loss:
        held_out = _series(evals, held_out_loss)[1]
        loss_lines.append((_title_of(held_out_loss), *_series(evals, held_out_loss), "o-"))
    loss_range = robust_range(
        _series(train, train_loss)[1], held_out + [v for _, v in reference], _min_span("loss")
    )
    title = ("training and held-out " + what) if held_out_loss else ("training " + what)
    plots = {
        "loss.png": [Panel(title, _unit(train_loss, kind), loss_lines, reference, loss_range)],
        "lr.png": [
            Panel(_lr_title(Path(run_dir)), "learning rate", [("lr", *_series(train, "lr"), "-")])
        ],
        "throughput.png": [
            Panel(
                "training throughput",
                "tokens/s",
                [("tokens/s", *_series(train, "tokens_per_s"), "-")],
            )
        ],
    }
    if evals and _eval_keys(evals):
        plots["eval.png"] = [
            Panel(
                _title_of(k),
                _unit(k, kind),
                [(_title_of(k), *_series(evals, k), "o-")],
                reference if k == "mlm_loss" else [],
                robust_range(
                    _series(evals, k)[1],
                    [v for _, v in reference] if k == "mlm_loss" else [],
                    _min_span(k),
                ),
            )
            for k in _eval_keys(evals)
        ]
    return plots


def _lr_title(run_dir: Path) -> str:
    """The lr plot's title; a time-budgeted run's says that its schedule follows training
    time, not steps (a slow stretch shows as a kink against the step)."""
    if (run_dir / rundir.CONFIG).is_file():
        try:
            train = RunConfig.load(run_dir / rundir.CONFIG).train
        except BertforgeError:
            return "learning rate"
        if train.time_budget:
            return (
                f"learning rate (follows training time: a {train.time_budget / 60:g}-minute "
                f"budget, not a step count)"
            )
    return "learning rate"


def _eval_keys(evals: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for record in evals:
        keys += [
            k
            for k, v in record.items()
            if k not in _NOT_PLOTTED
            and k not in keys
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        ]
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
    require_owned(out, "report")  # before the work: a folder of the user's stays theirs
    baseline = unigram_baseline_loss(run_dir) if _series(evals, "mlm_loss")[0] else None
    plots = plot_panels(run_dir, train, evals, baseline)
    tmp = sibling(out)
    make_dir(out.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:  # built beside, then swapped in whole
        for name, panels in plots.items():
            build_figure(panels).savefig(tmp / name, format="png")
        write_text_atomic(
            tmp / "report.md", _markdown(run_dir, train, evals, list(plots), baseline)
        )
        replace_owned(tmp, out, "report")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _config_text(run_dir: Path) -> tuple[str, str]:
    if (run_dir / rundir.CONFIG).is_file():
        return "yaml", (run_dir / rundir.CONFIG).read_text()
    spec = run_dir / "finetune.json"  # a fine-tuning output directory
    if spec.is_file():
        return "json", spec.read_text()
    return "", "(no config.yaml in this directory)\n"


def _title(run_dir: Path) -> str:
    """What the run is, for report.md's heading: its kind, name and size."""
    name = run_dir.resolve().name
    kind = _kind(run_dir)
    if kind == "pretrain":
        try:
            cfg = RunConfig.load(run_dir / rundir.CONFIG)
        except BertforgeError:
            return f"bertforge pretraining run `{name}`"
        m = cfg.model
        size = (m.num_hidden_layers, m.hidden_size, m.num_attention_heads)
        named = next(
            (
                f"{p} preset, "
                for p, v in PRESETS.items()
                if v == size and m.intermediate_size == 4 * m.hidden_size
            ),
            "",
        )
        return (
            f"bertforge pretraining run `{name}`: {named}{m.num_hidden_layers} layers, "
            f"hidden {m.hidden_size}, {m.num_attention_heads} heads, {cfg.data.objective} "
            f"on sequences of {cfg.data.seq_len} tokens"
        )
    if kind:
        try:
            spec = json.loads((run_dir / "finetune.json").read_text())
            return f"bertforge fine-tuning run `{name}`: {spec['task']} from {spec['model']}"
        except (ValueError, KeyError, TypeError):
            return f"bertforge fine-tuning run `{name}`"
    return f"bertforge run `{name}`"


def _markdown(
    run_dir: Path,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    plots: list[str],
    baseline: float | None = None,
) -> str:
    # The run's last step is the latest logged one, a training or an evaluation line (the
    # final evaluation runs at the last step, which need not be a logging step).
    last = max(train + evals, key=lambda r: r["step"])
    at = f"step {last['step']:,}"
    loss_key = (
        "mlm_loss" if any(isinstance(r.get("mlm_loss"), (int, float)) for r in train) else "loss"
    )
    recent = [r for r in train[-10:] if isinstance(r.get(loss_key), (int, float))]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    rows = [
        ("steps", f"{last['step']:,}"),
        (f"tokens trained on ({at})", f"{last.get('tokens', 0):,}"),
        (f"training time ({at})", f"{last.get('elapsed_s', 0) / 60:.1f} min"),
    ]
    with_epoch = [r for r in train + evals if isinstance(r.get("epoch"), (int, float))]
    if with_epoch:
        latest = max(with_epoch, key=lambda r: r["step"])
        rows.append((f"epochs (step {latest['step']:,})", f"{latest['epoch']:.2f}"))
    if recent:
        steps = (
            f"step {recent[0]['step']:,}"
            if len(recent) == 1
            else f"mean of logged steps {recent[0]['step']:,}-{recent[-1]['step']:,}"
        )
        rows.append(
            (
                f"training {loss_key} ({steps})",
                f"{sum(r[loss_key] for r in recent) / len(recent):.4f}",
            )
        )
    if speeds:
        rows.append(("median tokens/s (logged training steps)", f"{speeds[len(speeds) // 2]:,.0f}"))
    if evals:
        final = evals[-1]
        for key in _eval_keys(evals) + (["perplexity"] if "perplexity" in final else []):
            if isinstance(final.get(key), (int, float)):
                rows.append((f"held-out {key} (step {final['step']:,})", f"{final[key]:.4f}"))
                if key == "mlm_loss" and baseline is not None:
                    rows.append(
                        (
                            "held-out unigram-frequency baseline (the same masked tokens)",
                            f"{baseline:.4f}",
                        )
                    )
    lang, config = _config_text(run_dir)
    lines = [f"# {_title(run_dir)}", "", "| | |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if baseline is not None:
        lines += [
            "",
            "Losses are in nats per masked token. The unigram-frequency baseline "
            "predicts every masked token from its frequency in the training data; a "
            "held-out loss well below it is what the model learned beyond word "
            "frequencies.",
        ]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    lines += ["", "## Config", "", f"```{lang}", config.rstrip(), "```", ""]
    return "\n".join(lines)
