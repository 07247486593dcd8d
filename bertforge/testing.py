"""Tiny data, a tiny run's config and independent readers of a run, shared by tests/,
scripts/ and benchmarks/.

The data is a corpus generated from a small vocabulary (a few KB, so a WordPiece
tokenizer of 200 ids learns it in a second), its tokenizer and its token shards. The
readers look at what a run leaves on disk without the library's own checks: the train
records of metrics.jsonl (skipping a line being written) and the checkpoints whose every
file matches the sha256 in its state.json. No command imports this module.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bertforge.config import RunConfig

NOUNS = [
    "cat",
    "dog",
    "bird",
    "horse",
    "king",
    "queen",
    "river",
    "city",
    "garden",
    "teacher",
    "doctor",
    "ship",
]
ADJS = ["small", "large", "red", "green", "old", "young", "quiet", "bright", "happy", "dark"]
VERBS = ["sees", "follows", "finds", "likes", "meets", "paints", "helps", "watches"]


def make_document(rng: random.Random, sentences: int = 6) -> str:
    """One document of `sentences` generated sentences."""
    out = []
    for _ in range(sentences):
        out.append(
            f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} near the {rng.choice(NOUNS)}."
        )
    return " ".join(out)


def write_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    """A plain-text corpus of generated documents, separated by blank lines."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(make_document(rng) for _ in range(documents)) + "\n")
    return path


def make_tiny_data(
    root: Path,
    corpus: Path | None = None,
    documents: int = 120,
    vocab_size: int = 200,
    seq_len: int = 32,
    valid_fraction: float = 0.05,
) -> Path:
    """Token shards under root/data, from `corpus` (default: a generated one written to
    root/corpus.txt) and a WordPiece tokenizer trained on it in root/tokenizer."""
    from bertforge.data.prepare import prepare
    from bertforge.data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = write_corpus(root / "corpus.txt", documents=documents)
    train_tokenizer([str(corpus)], root / "tokenizer", vocab_size=vocab_size, show_progress=False)
    prepare(
        [str(corpus)],
        root / "tokenizer",
        root / "data",
        seq_len=seq_len,
        valid_fraction=valid_fraction,
        show_progress=False,
    )
    return root / "data"


def tiny_run_config(objective: str = "mlm", **train) -> RunConfig:
    """A RunConfig for tiny fp32 pretraining runs on shards of seq_len 32 (a 2-layer,
    64-wide model without dropout); `train` overrides TrainConfig fields."""
    from bertforge.config import DataConfig, RunConfig, TrainConfig, preset

    model = preset(
        "tiny",
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values: dict[str, Any] = dict(
        batch_size=16,
        micro_batch_size=16,
        lr=2e-3,
        warmup_fraction=0.1,
        max_steps=40,
        log_every=1,
        eval_every=20,
        eval_sequences=64,
        precision="fp32",
        seed=0,
    )
    values.update(train)
    return RunConfig(
        model=model, data=DataConfig(seq_len=32, objective=objective), train=TrainConfig(**values)
    )


def train_records(run: Path) -> list[dict]:
    """The train records of run/metrics.jsonl, in order; a line cut short by a kill, or
    being written, is skipped."""
    path = run / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            records.append(record)
    return records


def complete_checkpoints(run: Path) -> list[str]:
    """The names of run's checkpoints whose every file matches the sha256 recorded in their
    state.json, oldest first: checked here, independently of the library."""
    names = []
    for d in (run / "checkpoints").glob("step-*"):
        if not d.name.split("-")[1].isdigit():  # a temporary directory
            continue
        try:
            sums = json.loads((d / "state.json").read_text())["checksums"]
            if all(hashlib.sha256((d / f).read_bytes()).hexdigest() == h for f, h in sums.items()):
                names.append(d.name)
        except (OSError, ValueError, KeyError):
            continue
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def reference_run_argv(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`bertforge pretrain`'s arguments for the reference run that the resume tests and
    scripts/kill_resume.py interrupt and resume: tiny, in micro-batches, with dropout (so
    that the RNG state matters), fp32, a metrics line every step. Later flags override
    earlier ones."""
    # fmt: off
    return [
        "pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
        "--preset", "tiny", "--hidden-size", "64", "--num-attention-heads", "2",
        "--intermediate-size", "128", "--max-position-embeddings", "64", "--seq-len", "32",
        "--dropout", "0.1", "--batch-size", "16", "--micro-batch-size", "4", "--lr", "2e-3",
        "--warmup-fraction", "0.1", "--log-every", "1", "--eval-every", "0",
        "--eval-sequences", "32", "--precision", "fp32", "--seed", "0", "--quiet", *extra,
    ]
    # fmt: on
