"""Kill a tiny `bertforge pretrain` run with SIGKILL at random moments, resume it each
time, and check that it ends exactly where an uninterrupted run ends.

    python scripts/kill_resume.py [--kills 10] [--steps 60] [--seed 0]

The run checkpoints every step (keep-last 2), has dropout on and accumulates 4
micro-batches per step. Kills are timed in turn: at a random moment a few steps into
the attempt (mid-step or mid-save), aimed at a checkpoint write (just after a
checkpoint's temporary directory appears), and at a random moment of the startup
(imports, model build, checkpoint loading). Before each resume
the newest complete checkpoint is found independently (every file's sha256 against
state.json), and the resume must start from exactly that one. At the end the per-step
losses in metrics.jsonl must equal the uninterrupted run's bitwise, and the final weights
must be equal. Prints a verdict; exits 1 on failure. About a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertforge.testing import (
    complete_checkpoints,
    make_tiny_data,
    reference_run_argv,
    train_records,
)


def command(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bertforge", *reference_run_argv(data, out, steps),
            "--checkpoint-every", "1", "--keep-last", "2", *extra]  # fmt: skip


def launch(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # light, and the same in every run
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train_records(run)]


def last_step(run: Path) -> int:
    records = train_records(run)
    return records[-1]["step"] if records else 0


def new_temp_dirs(run: Path, since: float) -> list[str]:
    """Checkpoint temporary directories created after `since` (time.time())."""
    try:
        entries = list(os.scandir(run / "checkpoints"))
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        try:
            if e.name.endswith(".tmp") and e.is_dir() and e.stat().st_mtime >= since:
                found.append(e.name)
        except FileNotFoundError:  # renamed into place meanwhile
            continue
    return found


def moment(run: Path, since: float, resumed_at: int | None) -> str:
    """Where the kill landed, judged from what the attempt left behind."""
    if new_temp_dirs(run, since):
        return "mid checkpoint write"
    complete = complete_checkpoints(run)
    latest = run / "checkpoints" / "latest"
    if (
        complete
        and (run / "checkpoints" / complete[-1] / "state.json").stat().st_mtime >= since
        and (not latest.exists() or latest.read_text().strip() != complete[-1])
    ):
        return "after rename, before `latest`"
    if resumed_at is None or last_step(run) <= resumed_at:
        return "startup (before a step)"
    return "mid-step"


# How each kill is timed, in turn.
KINDS = ["random", "aimed", "random", "startup"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    failures: list[str] = []

    with tempfile.TemporaryDirectory(prefix="bertforge-kill-") as tmp:
        root = Path(tmp)
        data = make_tiny_data(root, documents=200)

        # The uninterrupted reference, timed to place the kills.
        ref = root / "reference"
        t0 = time.monotonic()
        proc = launch(command(data, ref, args.steps))
        first = None
        while proc.poll() is None:
            if first is None and last_step(ref) >= 1:
                first = time.monotonic() - t0
            if last_step(ref) >= args.steps:
                break
            time.sleep(0.005)
        trained = time.monotonic() - t0
        _, err = proc.communicate()
        if proc.returncode != 0 or first is None:
            print(f"FAIL: the reference run failed:\n{err}")
            return 1
        step_time = (trained - first) / max(args.steps - 1, 1)
        print(
            f"reference: {args.steps} steps; first step after {first:.2f}s, then "
            f"{1000 * step_time:.0f} ms/step (with a checkpoint each step)"
        )

        run = root / "run"
        rows = []
        for i in range(args.kills):
            newest = (complete_checkpoints(run) or [None])[-1]
            resume = (run / "config.yaml").exists()
            since = time.time() - 0.01  # mtimes may be a little coarse
            proc = launch(command(data, run, args.steps, *(["--resume"] if resume else [])))
            kind = KINDS[i % len(KINDS)]
            deadline = time.monotonic() + 3 * first + 20 * step_time
            if kind == "startup":  # while importing, building the model, loading
                time.sleep(rng.uniform(0, first))
            elif kind == "aimed":  # as soon as a new checkpoint's temporary directory appears
                while time.monotonic() < deadline and proc.poll() is None:
                    if new_temp_dirs(run, since):
                        time.sleep(rng.uniform(0, 0.002))
                        break
                    time.sleep(0.0005)
            else:  # a random moment a few steps into the attempt
                target = int(newest.split("-")[1]) if newest else 0
                target += rng.randint(1, 4)
                while time.monotonic() < deadline and proc.poll() is None:
                    if (
                        (run / "metrics.jsonl").exists()
                        and last_step(run) >= target
                        and (run / "metrics.jsonl").stat().st_mtime >= since
                    ):
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 2 * step_time))
            if proc.poll() is not None:
                failures.append(
                    f"attempt {i + 1} ended before its kill "
                    f"(status {proc.returncode}); use more --steps"
                )
                break
            proc.kill()
            _, err = proc.communicate()
            found = re.search(r"resuming from (step-\d+)", err)
            resumed_at = (
                int(found.group(1).split("-")[1])
                if found
                else 0
                if "starting from step 0" in err or not resume
                else None
            )
            where = moment(run, since, resumed_at)
            if found:
                started = found.group(1)
                if started != newest:
                    failures.append(
                        f"attempt {i + 1} resumed from {started}, but the newest "
                        f"complete checkpoint was {newest}"
                    )
            elif "starting from step 0" in err:
                started = "step 0"
                if newest is not None:
                    failures.append(f"attempt {i + 1} started over although {newest} existed")
            else:
                started = "(killed before choosing)" if resume else "(fresh start)"
            rows.append((i + 1, kind, where, started, last_step(run)))

        # The last resume runs to the end.
        newest = (complete_checkpoints(run) or [None])[-1]
        proc = launch(command(data, run, args.steps, "--resume"))
        _, err = proc.communicate()
        found = re.search(r"resuming from (step-\d+)", err)
        if proc.returncode != 0:
            failures.append(
                f"the final resume failed (status {proc.returncode}): "
                f"{err.strip().splitlines()[-1:]}"
            )
        elif not found or found.group(1) != newest:
            failures.append(
                f"the final resume started from "
                f"{found.group(1) if found else None}, newest complete: {newest}"
            )

        print(
            f"\n{'kill':>4}  {'timing':<7}  {'landed':<30}  {'next resume from':<24}  "
            f"{'last step logged':>16}"
        )
        for n, (kill, timing, where, _, step) in enumerate(rows):
            resumed = rows[n + 1][3] if n + 1 < len(rows) else (found.group(1) if found else "?")
            print(f"{kill:>4}  {timing:<7}  {where:<30}  {resumed:<24}  {step:>16}")

        ref_losses, losses = train_losses(ref), train_losses(run)
        if [s for s, _ in losses] != list(range(1, args.steps + 1)):
            failures.append(f"metrics.jsonl steps are not 1..{args.steps} exactly once")
        differ = [s for (s, a), (_, b) in zip(ref_losses, losses) if a != b]
        if differ or len(ref_losses) != len(losses):
            failures.append(f"per-step losses differ from the reference at steps {differ[:5]}")
        if not failures:
            import torch

            from bertforge.train.checkpoint import find_latest, load_weights

            a = load_weights(find_latest(ref / "checkpoints")[0])
            b = load_weights(find_latest(run / "checkpoints")[0])
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                failures.append("final weights differ from the reference")
        mid_save = sum(
            1 for r in rows if r[2] in ("mid checkpoint write", "after rename, before `latest`")
        )
        print(
            f"\n{len(rows)} kills ({mid_save} during a checkpoint write), "
            f"{len(rows) + 1} resumes; {len(losses)} per-step losses compared bitwise "
            f"with the uninterrupted run"
        )
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print(
        "PASS: every resume started from the newest complete checkpoint; losses and "
        "final weights equal the uninterrupted run's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
