"""Time to quality: bertforge against transformers' Trainer on the same budget.

Both train on the same tokenizer, the same packed 128-token training sequences and the
same wall-clock budget, and are scored on the same held-out masked tokens (bertforge's
fixed evaluation masks). Evaluation pauses both clocks.

- transformers: BertForMaskedLM (the same architecture) trained by `Trainer` the way
  examples/pytorch/language-modeling/run_mlm.py trains it: DataCollatorForLanguageModeling
  (15%, 80/10/10), AdamW at run_mlm's default lr 5e-5 with a linear schedule and no
  warmup, batch 32, bf16 autocast where the CPU supports it, dropout 0.1. Trainer has no
  time budget, so max_steps is set from a timed probe to end its schedule at the deadline,
  and a callback stops it there.
- bertforge: its best recipe for a short budget: the `mini` preset, no dropout, batch 16,
  lr 1e-3 with warmup and a linear decay that reaches zero exactly at the deadline.
  (Five-minute probes on this data, held-out MLM loss: batch 64 6.99, 32 6.86, 16 6.77,
  8 at lr 7e-4 6.77; lr 2e-3 at batch 64 7.28.)

    python benchmarks/time_to_quality.py --budget 15m --out benchmarks/results/ttq

Prints both curves' figures, writes results.json and curves.png to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bertforge.cli.options import parse_duration
from bertforge.commands.evaluate import EVAL_MASK_SEED, unigram_baseline
from bertforge.commands.pretrain import run_pretrain
from bertforge.config import DataConfig, RunConfig, TrainConfig, preset
from bertforge.data.loader import ShardedSequences, eval_batches
from bertforge.data.masking import Masker
from bertforge.data.prepare import prepare
from bertforge.data.tokenizer import train_tokenizer
from bertforge.model.ops import cross_entropy_sum
from bertforge.train.runtime import configure, resolve_precision

DEFAULT_CORPUS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki-2015-wikiextractor-sample"
)


def hf_eval_loss(model: torch.nn.Module, valid: ShardedSequences, masker: Masker) -> float:
    """Held-out MLM loss of a transformers model on bertforge's fixed evaluation masks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(valid, masker, 64, 0, EVAL_MASK_SEED):
            kwargs = (
                {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
            )
            logits = model(input_ids=batch.input_ids, **kwargs).logits  # (B, T, V)
            picked = logits.flatten(0, 1)[batch.masked_positions]
            total += cross_entropy_sum(picked.float(), batch.targets).item()
            count += batch.targets.numel()
    model.train()
    return total / count


def run_transformers(
    data_dir: Path, tok_dir: Path, budget: float, eval_every: float, out: Path, masker: Masker
) -> list[dict]:
    import transformers
    from torch.utils.data import Dataset

    train = ShardedSequences(data_dir, "train")
    valid = ShardedSequences(data_dir, "valid")

    class Sequences(Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": torch.from_numpy(train.take(np.array([i]))[0])}

    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    cfg = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    bf16 = resolve_precision("auto", torch.device("cpu")) is not None
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    curve: list[dict] = []

    class Budget(transformers.TrainerCallback):
        """Stops at the deadline; evaluates every `eval_every` training seconds, off the clock."""

        def __init__(self) -> None:
            self.start = time.monotonic()
            self.paused = 0.0
            self.next_eval = eval_every

        def elapsed(self) -> float:
            return time.monotonic() - self.start - self.paused

        def on_step_end(self, args, state, control, **kw):
            t = self.elapsed()
            if t >= self.next_eval or t >= budget:
                t0 = time.monotonic()
                loss = hf_eval_loss(model, valid, masker)
                self.paused += time.monotonic() - t0
                curve.append(
                    {"elapsed_s": round(t, 1), "step": state.global_step, "mlm_loss": loss}
                )
                print(
                    f"transformers: step {state.global_step}, {t:.0f}s, held-out loss {loss:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
                self.next_eval += eval_every
            if t >= budget:
                control.should_training_stop = True
            return control

    def trainer(max_steps: int, callbacks: list) -> transformers.Trainer:
        args = transformers.TrainingArguments(
            output_dir=str(out / "hf-trainer"),
            per_device_train_batch_size=32,
            learning_rate=5e-5,
            lr_scheduler_type="linear",
            max_steps=max_steps,
            bf16=bf16,
            use_cpu=True,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        return transformers.Trainer(
            model=model,
            args=args,
            train_dataset=Sequences(),
            data_collator=collator,
            callbacks=callbacks,
        )

    # A probe of a few steps sets max_steps so the linear schedule ends at the deadline.
    class StepTimes(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.monotonic())

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    probe = StepTimes()
    trainer(6, [probe]).train()
    per_step = float(np.median(np.diff(probe.times[1:])))  # the first step warms up
    model.load_state_dict(initial)
    max_steps = max(10, int(budget / per_step))
    print(f"transformers: ~{per_step:.2f}s/step, max_steps {max_steps}", file=sys.stderr)
    trainer(max_steps, [Budget()]).train()
    return curve


def run_bertforge(data_dir: Path, budget: float, eval_every_steps: int, out: Path) -> list[dict]:
    run = out / "bertforge-run"
    if run.exists():
        shutil.rmtree(run)
    cfg = RunConfig(
        model=preset("mini", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        data=DataConfig(seq_len=128),
        train=TrainConfig(
            batch_size=16,
            micro_batch_size=16,
            lr=1e-3,
            adam_beta2=0.98,
            warmup_fraction=0.05,
            time_budget=budget,
            eval_every=eval_every_steps,
            eval_sequences=0,
            log_every=10,
            keep_last=1,
        ),
    )
    run_pretrain(run, cfg, data_dir=data_dir, show_progress=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {"elapsed_s": x["elapsed_s"], "step": x["step"], "mlm_loss": x["mlm_loss"]}
        for x in lines
        if x["kind"] == "eval"
    ]


def time_to_reach(curve: list[dict], loss: float) -> float | None:
    """First time (linearly interpolated between evaluations) the curve is at or below loss."""
    prev = {"elapsed_s": 0.0, "mlm_loss": float("inf")}
    for point in curve:
        if point["mlm_loss"] <= loss:
            if not np.isfinite(prev["mlm_loss"]):
                return point["elapsed_s"]
            frac = (prev["mlm_loss"] - loss) / (prev["mlm_loss"] - point["mlm_loss"])
            return prev["elapsed_s"] + frac * (point["elapsed_s"] - prev["elapsed_s"])
        prev = point
    return None


def plot(curves: dict[str, list[dict]], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(
            [p["elapsed_s"] / 60 for p in curve],
            [p["mlm_loss"] for p in curve],
            marker="o",
            ms=3,
            label=name,
        )
    ax.axhline(baseline, color="grey", ls="--", lw=1, label="unigram-frequency baseline")
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("held-out MLM loss (same masked tokens)")
    ax.set_title("Time to quality, same tokenizer, data and CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--budget", type=parse_duration, default=900.0)
    p.add_argument("--out", default="benchmarks/results/ttq")
    p.add_argument("--only", choices=["bertforge", "transformers"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configure(torch.device("cpu"))
    tok_dir, data_dir = out / "tokenizer", out / "data"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer([args.corpus], tok_dir, vocab_size=30522, show_progress=False)
    if not (data_dir / "manifest.json").exists():
        prepare(
            [args.corpus], tok_dir, data_dir, seq_len=128, valid_fraction=0.02, show_progress=False
        )
    manifest = json.loads((data_dir / "manifest.json").read_text())
    masker = Masker(manifest["vocab_size"], manifest["special_token_ids"])
    valid = ShardedSequences(data_dir, "valid")
    baseline = unigram_baseline(ShardedSequences(data_dir, "train"), valid, masker)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(budget_s=args.budget, unigram_baseline_loss=baseline, valid_sequences=len(valid))
    curves = results.setdefault("curves", {})
    if args.only != "bertforge":
        curves["transformers Trainer (run_mlm recipe)"] = run_transformers(
            data_dir, tok_dir, args.budget, args.budget / 10, out, masker
        )
    if args.only != "transformers":
        curves["bertforge (mini, short-budget recipe)"] = run_bertforge(
            data_dir, args.budget, 100, out
        )
    hf_curve = curves.get("transformers Trainer (run_mlm recipe)")
    bf_curve = curves.get("bertforge (mini, short-budget recipe)")
    if hf_curve and bf_curve:
        hf_final = hf_curve[-1]["mlm_loss"]
        reach = time_to_reach(bf_curve, hf_final)
        results["transformers_final_loss"] = hf_final
        results["bertforge_final_loss"] = bf_curve[-1]["mlm_loss"]
        results["bertforge_time_to_transformers_final_s"] = reach
        results["time_fraction"] = None if reach is None else reach / hf_curve[-1]["elapsed_s"]
        print(
            f"unigram baseline {baseline:.3f}; transformers final {hf_final:.3f} at "
            f"{hf_curve[-1]['elapsed_s']:.0f}s; bertforge final {bf_curve[-1]['mlm_loss']:.3f}"
            f"; bertforge reached {hf_final:.3f} after "
            f"{'never' if reach is None else f'{reach:.0f}s'}"
            + ("" if reach is None else f" ({results['time_fraction']:.0%} of the time)")
        )
        plot(curves, baseline, out / "curves.png")
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
