"""When does a short pretraining run leave the unigram plateau?

For each run directory given, reads its held-out evaluations (metrics.jsonl) and the
unigram-frequency baseline on the same masked tokens, and reports the first evaluated step
whose held-out MLM loss is at least --margin (0.3) nats below the baseline, and the gap at
the last evaluation. Loss curves against the step do not depend on the machine's speed,
so runs on a slow or shared machine are valid evidence.

    python benchmarks/plateau.py RUN_DIR... --out benchmarks/results/demo_plateau.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bertforge.commands.report import read_metrics, unigram_baseline_loss
from bertforge.config import RunConfig


def summarise(run_dir: Path, margin: float) -> dict[str, Any]:
    """The plateau figures of one run: its recipe, baseline, first step `margin` below it,
    and every evaluation's gap."""
    cfg = RunConfig.load(run_dir / "config.yaml")
    _, evals = read_metrics(run_dir)
    baseline = unigram_baseline_loss(run_dir)
    curve = [(r["step"], r["mlm_loss"]) for r in evals if "mlm_loss" in r]
    below = next(
        (s for s, loss in curve if baseline is not None and loss <= baseline - margin), None
    )
    m, d, t = cfg.model, cfg.data, cfg.train
    return {
        "run": run_dir.name,
        "model": {
            "layers": m.num_hidden_layers,
            "hidden": m.hidden_size,
            "vocab_size": m.vocab_size,
            "initializer_range": m.initializer_range,
            "dropout": m.hidden_dropout_prob,
        },
        "mask_rate": d.mask_rate,
        "lr": t.lr,
        "warmup_steps": t.warmup_steps,
        "batch_size": t.batch_size,
        "max_steps": t.max_steps,
        "precision": t.precision,
        "seed": t.seed,
        "unigram_baseline_loss": round(baseline, 4) if baseline is not None else None,
        f"first_step_{margin:g}_below_baseline": below,
        "last_step": curve[-1][0] if curve else None,
        "last_gap": round(baseline - curve[-1][1], 4) if curve and baseline else None,
        "curve": [
            {
                "step": s,
                "mlm_loss": round(loss, 4),
                "gap": round(baseline - loss, 4) if baseline else None,
            }
            for s, loss in curve
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="pretraining run directories")
    p.add_argument("--margin", type=float, default=0.3, help="nats below the baseline")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--note", default="", help="how the runs were made (kept in the JSON)")
    args = p.parse_args(argv)
    rows = [summarise(r, args.margin) for r in args.runs]
    # The runs by name (where they lay on the measuring machine is of no use to a reader).
    result = {
        "command": "python benchmarks/plateau.py "
        + " ".join(r.name for r in args.runs)
        + f" --margin {args.margin:g}",
        "note": args.note,
        "margin": args.margin,
        "runs": rows,
    }
    for r in rows:
        print(
            f"{r['run']}: baseline {r['unigram_baseline_loss']}, first {args.margin:g} below "
            f"at step {r[f'first_step_{args.margin:g}_below_baseline']}, gap {r['last_gap']} "
            f"at step {r['last_step']}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
