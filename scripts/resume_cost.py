"""How much a resume costs at step 10 versus far into a run: it should not grow with the step.

    python scripts/resume_cost.py

1. The loader: the time to produce the first micro-batch of step 10, 10,000 and
   1,000,000 from a fresh `PretrainBatches` (batches are a pure function of the step,
   so nothing is replayed; the cost is one permutation of the current epoch).
2. A whole resume of a tiny run (`run_pretrain(..., resume=True)` for one more step:
   config, data, model, checkpoint loading, one step, evaluation, export), from a
   checkpoint at step 10 and from the same checkpoint relabelled as step 10,000
   (state.json edited, checksums kept valid).

Prints the times (median of a few repeats) and the ratios.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a light, steady measurement

import torch

from bertforge.commands.pretrain import run_pretrain
from bertforge.config import RunConfig
from bertforge.data.loader import PretrainBatches, ShardedSequences
from bertforge.data.masking import Masker
from bertforge.testing import make_tiny_data, tiny_run_config
from bertforge.train import checkpoint as ckpt

WORDS = (
    "cat dog bird horse king queen river city garden teacher doctor ship small large red "
    "green old young quiet bright happy dark sees follows finds likes meets paints helps "
    "watches near the a of"
).split()


def make_data(root: Path, documents: int) -> Path:
    """Documents of 40 to 120 words: many sequences for the loader to choose from."""
    rng = random.Random(0)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + "."
        for _ in range(documents)
    ]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return make_tiny_data(root, corpus=root / "corpus.txt", valid_fraction=0.01)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loader_times(data: Path) -> dict[int, float]:
    train = ShardedSequences(data, "train")
    m = train.manifest
    masker = Masker(int(m["vocab_size"]), m["special_token_ids"])

    def first_batch(step: int) -> None:
        batches = PretrainBatches(train, masker, batch_size=256, micro_batch_size=32, seed=0)
        next(iter(batches.micro_batches(step)))  # a fresh object: nothing cached

    first_batch(10)  # warm the page cache and numpy
    print(f"loader: {len(train):,} training sequences, global batch 256, micro-batch 32")
    return {step: median_time(lambda s=step: first_batch(s), 7) for step in (10, 10_000, 1_000_000)}


def tiny_config(max_steps: int) -> RunConfig:
    return tiny_run_config(
        max_steps=max_steps,
        micro_batch_size=4,
        eval_every=0,
        eval_sequences=32,
        checkpoint_every=10,
        keep_last=10,
    )


def relabel(run: Path, step: int) -> None:
    """Make the run's step-10 checkpoint claim to be step `step`, checksums kept valid."""
    d = run / "checkpoints"
    new = d / f"step-{step:06d}"
    os.replace(d / "step-000010", new)
    state = json.loads((new / "state.json").read_text())
    state["tokens"] = state["tokens"] // state["step"] * step
    state["step"] = step
    ckpt.write_state(new, state)
    (d / "latest").write_text(new.name + "\n")
    assert ckpt.verify(new)["step"] == step


def resume_times(root: Path, data: Path, repeats: int = 3) -> dict[int, float]:
    base = root / "base"
    run_pretrain(base, tiny_config(10), data_dir=data, show_progress=False)
    runs = {}
    for step in (10, 10_000):
        runs[step] = root / f"at{step}"
        shutil.copytree(base, runs[step])
        if step != 10:
            relabel(runs[step], step)
    times: dict[int, list[float]] = {10: [], 10_000: []}
    for _ in range(repeats):
        for step, run in runs.items():
            work = root / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(run, work)
            cfg = tiny_config(step + 1)
            t0 = time.perf_counter()
            result = run_pretrain(
                work,
                cfg,
                data_dir=data,
                resume=True,
                given={"train": {"max_steps": step + 1}},
                show_progress=False,
            )
            times[step].append(time.perf_counter() - t0)
            assert result["step"] == step + 1
    return {step: statistics.median(t) for step, t in times.items()}


def main() -> int:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory(prefix="bertforge-resume-cost-") as tmp:
        root = Path(tmp)
        data = make_data(root, documents=4000)
        loader = loader_times(data)
        for step, t in loader.items():
            print(
                f"  first micro-batch of step {step:>9,}: {1000 * t:7.2f} ms "
                f"({t / loader[10]:.2f}x step 10)"
            )
        stderr = sys.stderr
        sys.stderr = open(os.devnull, "w")  # run_pretrain's progress notes
        try:
            resume = resume_times(root, data)
        finally:
            sys.stderr.close()
            sys.stderr = stderr
        print("resume of a tiny run for one more step (load, step, evaluate, export):")
        for step, t in resume.items():
            print(f"  from step {step:>6,}: {1000 * t:7.1f} ms ({t / resume[10]:.2f}x step 10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
