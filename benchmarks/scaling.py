"""Throughput of one process against N processes under torchrun, on the same data.

    python benchmarks/scaling.py --data DATA_DIR [--procs 2] [--threads 1] [--preset mini]

Each configuration is a real `bertforge pretrain` run (same global batch, seed and
data; dropout 0.1; bf16 where the CPU has it); the figure is the mean tokens/s of its
train metrics lines after the first `--skip` steps (start-up and warm-up excluded).
Scaling efficiency = tokens/s with N processes / (N x tokens/s with one), each process
given the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: Path, out: Path, procs: int, threads: int, args: argparse.Namespace) -> float:
    launcher = (
        [sys.executable, "-m", "bertforge"]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "bertforge",
        ]
    )
    cmd = [
        *launcher,
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        args.preset,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--micro-batch-size",
        str(args.batch_size // procs),
        "--max-steps",
        str(args.steps),
        "--log-every",
        "1",
        "--eval-sequences",
        "64",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tokens_per_s"] for x in lines if x["kind"] == "train" and x["step"] > args.skip]
    result = sum(tps) / len(tps)
    print(
        f"{procs} process(es) x {threads} thread(s): {result:,.0f} tokens/s "
        f"({args.steps} steps, {wall:.0f} s wall)",
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a prepared data directory")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--preset", default="mini")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="steps left out of the mean")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.data, Path(tmp, "one"), 1, args.threads, args)
        many = run(args.data, Path(tmp, "many"), args.procs, args.threads, args)
    efficiency = many / (args.procs * one)
    print(
        f"speed-up {many / one:.2f}x on {args.procs} processes: "
        f"scaling efficiency {100 * efficiency:.0f}%"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "batch_size": args.batch_size,
                    "seq_len": args.seq_len,
                    "threads_per_process": args.threads,
                    "processes": args.procs,
                    "tokens_per_s_1": round(one, 1),
                    f"tokens_per_s_{args.procs}": round(many, 1),
                    "scaling_efficiency": round(efficiency, 3),
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
