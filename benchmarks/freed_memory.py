"""Page faults and time per training step with glibc's malloc tuned and as it comes.

bertforge keeps freed memory in the process on Linux (`runtime.keep_freed_memory`:
mmap threshold fixed at 32 MB, no heap trimming); without it, every step faults its
large buffers in again. This runs the same training steps (`train_step`, as `bench` and
`pretrain` run them) in two fresh processes, tuned and with BERTFORGE_KEEP_FREED_MEMORY=0,
interleaved `--repeats` times, and prints minor page faults and milliseconds per step.

    python benchmarks/freed_memory.py --preset tiny --repeats 3 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_PROBE = """
import resource, sys, time, torch
from bertforge.commands.bench import synthetic_batch
from bertforge.config import TrainConfig, preset
from bertforge.train.optim import build_optimizer
from bertforge.tasks.mlm import mlm_loss_sum, pretraining_model
from bertforge.train.runtime import configure, keep_freed_memory, resolve_precision
from bertforge.train.step import StepBatch, train_step

device = torch.device("cpu")
configure(device)
cfg = preset(sys.argv[1])
batch = synthetic_batch(cfg, int(sys.argv[2]), 128)
model = pretraining_model(cfg, "mlm").train()
train = TrainConfig()
optimizer = build_optimizer(model, train)
dtype = resolve_precision("auto", device)
step_batch = StepBatch([batch], {"mlm": batch.targets.numel()}, batch.real_tokens)

def step():
    train_step(model, optimizer, mlm_loss_sum, step_batch, lr=1e-4, cfg=train,
               device=device, dtype=dtype)

for _ in range(5):
    step()
faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(5):
    step()
seconds = (time.perf_counter() - t0) / 5
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5
print(keep_freed_memory(), faults, seconds)
"""


def measure(preset: str, batch: int, tuned: bool) -> dict:
    env = dict(os.environ)
    env.pop("BERTFORGE_KEEP_FREED_MEMORY", None)
    if not tuned:
        env["BERTFORGE_KEEP_FREED_MEMORY"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, preset, str(batch)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    return {
        "kept": out[0] == "True",
        "faults_per_step": float(out[1]),
        "ms_per_step": 1e3 * float(out[2]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"tuned": [], "default": []}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits both alike
        runs["tuned"].append(measure(args.preset, args.batch_size, True))
        runs["default"].append(measure(args.preset, args.batch_size, False))
    summary = {
        name: {
            key: statistics.median(r[key] for r in rs) for key in ("faults_per_step", "ms_per_step")
        }
        for name, rs in runs.items()
    }
    for name, s in summary.items():
        print(
            f"{name:8s} {s['faults_per_step']:10,.0f} page faults/step "
            f"{s['ms_per_step']:8.1f} ms/step  (median of {args.repeats})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "preset": args.preset,
                    "batch_size": args.batch_size,
                    "runs": runs,
                    "median": summary,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
