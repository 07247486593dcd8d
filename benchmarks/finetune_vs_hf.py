"""Fine-tuning speed: `bertforge finetune` against transformers' Trainer, same everything.

The same model directory (an exported bertforge model or any HF BERT), the same training
and dev examples, batch, max length, learning rate, linear schedule with 10% warmup,
weight decay, epochs and precision (bf16 where the CPU has it), each side in a fresh
process with its best settings:

- bertforge: `bertforge finetune` with its defaults (length-grouped batches, each padded
  to its longest example);
- transformers: `Trainer` with DataCollatorWithPadding (each batch padded to its longest
  example), inputs tokenized beforehand (not timed as training), sdpa attention, bf16,
  fused AdamW (its default), length-grouped sampling (`train_sampling_strategy=
  "group_by_length"`, transformers 5's spelling of group_by_length; `--hf-sampling
  random` for its default), no evaluation or saving during training, dataloader in the
  main process.

Both report training time only (tokenization is timed and printed separately), then
score the dev set. Tasks: `sst2` (GLUE SST-2, single sentences) and `pairs`, sentence
pairs of MRPC-like length built from the Wikipedia sample (label: does B follow A in the
same document, or come from another one).

    python benchmarks/finetune_vs_hf.py --model runs/demo/hf --task sst2 --examples 6400
    python benchmarks/finetune_vs_hf.py --model runs/demo/hf --task pairs --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

_HF_SIDE = r"""
import json, sys, time
import numpy as np, torch, transformers
from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding,
                          Trainer, TrainingArguments)

a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
def read(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")][1:]
    return [r[:-1] for r in rows], [int(r[-1]) for r in rows]
train_x, train_y = read(a["train"])
dev_x, dev_y = read(a["dev"])
tok = AutoTokenizer.from_pretrained(a["model"])
t0 = time.perf_counter()
def encode(xs, ys):
    enc = tok(*zip(*xs), truncation=True, max_length=a["max_length"])
    return [{"input_ids": i, "token_type_ids": t, "attention_mask": m, "labels": y}
            for i, t, m, y in zip(enc["input_ids"], enc["token_type_ids"],
                                  enc["attention_mask"], ys)]
train, dev = encode(train_x, train_y), encode(dev_x, dev_y)
tokenize_s = time.perf_counter() - t0
model = BertForSequenceClassification.from_pretrained(a["model"], num_labels=2,
                                                      attn_implementation="sdpa")
args = TrainingArguments(
    output_dir=a["out"], per_device_train_batch_size=a["batch_size"],
    per_device_eval_batch_size=64, learning_rate=a["lr"], num_train_epochs=a["epochs"],
    warmup_steps=0.1, weight_decay=0.01, lr_scheduler_type="linear", bf16=a["bf16"],
    use_cpu=True, seed=a["seed"], train_sampling_strategy=a["sampling"], logging_steps=10**9,
    save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
    disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorWithPadding(tok))
out = trainer.train()
logits = trainer.predict(dev).predictions
accuracy = float((np.argmax(logits, -1) == np.array(dev_y)).mean())
print(json.dumps({"train_time_s": out.metrics["train_runtime"], "tokenize_time_s": tokenize_s,
                  "score": accuracy, "steps": out.global_step,
                  "transformers": transformers.__version__}))
"""


def write_sst2(source: Path, folder: Path, examples: int) -> tuple[Path, Path]:
    """The first `examples` SST-2 training sentences and the dev set, as sentence\\tlabel."""
    folder.mkdir(parents=True, exist_ok=True)
    train = (source / "train.tsv").read_text(encoding="utf-8").splitlines()
    (folder / "train.tsv").write_text("\n".join(train[: examples + 1]) + "\n", encoding="utf-8")
    dev = (source / "dev.tsv").read_text(encoding="utf-8")
    (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return folder / "train.tsv", folder / "dev.tsv"


def write_pairs(wiki: Path, folder: Path, examples: int, dev: int = 800) -> tuple[Path, Path]:
    """Sentence pairs of MRPC-like length (15-30 words each) from the Wikipedia sample:
    label 1 when B is the sentence after A in the same document, 0 when it comes from
    another document."""
    import re

    from bertforge.data.corpus import iter_documents, resolve_corpus

    docs = []
    for doc in iter_documents(resolve_corpus([str(wiki)])):
        sentences = [
            " ".join(s.split())
            for s in re.split(r"(?<=[.!?])\s+", doc)
            if 15 <= len(s.split()) <= 30
        ]  # one line each: tabs, newlines gone
        if len(sentences) >= 2:
            docs.append(sentences)
    rng = random.Random(0)
    rows = []
    while len(rows) < examples + dev:
        d = rng.randrange(len(docs))
        i = rng.randrange(len(docs[d]) - 1)
        if rng.random() < 0.5:
            rows.append((docs[d][i], docs[d][i + 1], 1))
        else:
            other = docs[(d + 1 + rng.randrange(len(docs) - 1)) % len(docs)]
            rows.append((docs[d][i], rng.choice(other), 0))
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", rows[:examples]), ("dev.tsv", rows[examples:])):
        text = "sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in part)
        (folder / name).write_text(text, encoding="utf-8")
    return folder / "train.tsv", folder / "dev.tsv"


def run_bertforge(args: argparse.Namespace, train: Path, dev: Path, seed: int, out: Path) -> dict:
    pair = (
        ["--text-column", "sentence1", "--text-pair-column", "sentence2"]
        if args.task == "pairs"
        else ["--text-column", "sentence"]
    )
    cmd = [
        sys.executable,
        "-m",
        "bertforge",
        "finetune",
        str(args.model),
        "--train",
        str(train),
        "--validation",
        str(dev),
        *pair,
        "--out",
        str(out),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--seed",
        str(seed),
        "--quiet",
        *args.bertforge_flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if proc.returncode:
        sys.exit(f"bertforge failed: {proc.stderr.strip().splitlines()[-1]}")
    summary = json.loads((out / "metrics.json").read_text())
    return {
        "train_time_s": summary["train_time_s"],
        "tokenize_time_s": summary["tokenize_time_s"],
        "score": summary["score"],
        "steps": summary["steps"],
    }


def run_transformers(
    args: argparse.Namespace, train: Path, dev: Path, seed: int, out: Path, bf16: bool
) -> dict:
    spec = {
        "model": str(args.model),
        "train": str(train),
        "dev": str(dev),
        "out": str(out),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "epochs": args.epochs,
        "max_length": args.max_length,
        "seed": seed,
        "bf16": bf16,
        "sampling": args.hf_sampling,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _HF_SIDE, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    if proc.returncode:
        sys.exit(f"transformers failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="an HF BERT directory")
    p.add_argument("--task", choices=["sst2", "pairs"], default="sst2")
    p.add_argument("--examples", type=int, default=6400, help="training examples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-length", type=int, default=None, help="default: 64 for sst2, 128 for pairs"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--hf-sampling",
        default="group_by_length",
        help="transformers' train_sampling_strategy (default: group_by_length)",
    )
    p.add_argument("--glue", type=Path, default=SHARED / "glue" / "SST-2")
    p.add_argument("--wiki", type=Path, default=SHARED / "enwiki-2015-wikiextractor-sample")
    p.add_argument(
        "--bertforge-flags",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra flags for bertforge finetune (last on the line)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    args.max_length = args.max_length or (64 if args.task == "sst2" else 128)
    sys.path.insert(0, str(ROOT))
    from bertforge.train.runtime import cpu_has_bf16

    bf16 = cpu_has_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, dev = (
            write_sst2(args.glue, work / "data", args.examples)
            if args.task == "sst2"
            else write_pairs(args.wiki, work / "data", args.examples)
        )
        runs = []
        for seed in args.seeds:  # interleaved, so the machine's drift hits both alike
            ours = run_bertforge(args, train, dev, seed, work / f"bf-{seed}")
            theirs = run_transformers(args, train, dev, seed, work / f"hf-{seed}", bf16)
            runs.append({"seed": seed, "bertforge": ours, "transformers": theirs})
            print(
                f"seed {seed}: bertforge {ours['train_time_s']:.1f}s (dev {ours['score']:.4f}), "
                f"transformers {theirs['train_time_s']:.1f}s (dev {theirs['score']:.4f})",
                flush=True,
            )
    n = args.examples * args.epochs
    summary = {}
    for side in ("bertforge", "transformers"):
        times = [r[side]["train_time_s"] for r in runs]
        summary[side] = {
            "train_time_s": statistics.median(times),
            "examples_per_s": n / statistics.median(times),
            "tokenize_time_s": statistics.median(r[side]["tokenize_time_s"] for r in runs),
            "dev_scores": [r[side]["score"] for r in runs],
        }
    ratio = summary["bertforge"]["examples_per_s"] / summary["transformers"]["examples_per_s"]
    for side, s in summary.items():
        scores = ", ".join(f"{x:.4f}" for x in s["dev_scores"])
        print(
            f"{side:13s} {s['examples_per_s']:8.1f} examples/s  train "
            f"{s['train_time_s']:6.1f}s  tokenize {s['tokenize_time_s']:.2f}s  dev {scores}"
        )
    print(
        f"speed-up {ratio:.2f}x ({args.task}, {args.examples} examples x {args.epochs} epoch(s), "
        f"batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, "
        f"{'bf16' if bf16 else 'fp32'}, seeds {args.seeds})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "task": args.task,
                    "examples": args.examples,
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "lr": args.lr,
                    "precision": "bf16" if bf16 else "fp32",
                    "model": str(args.model),
                    "runs": runs,
                    "summary": summary,
                    "speedup": round(ratio, 3),
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
