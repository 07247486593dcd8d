"""Learning-rate schedules: warmup in steps or as a fraction, linear and cosine decay,
time budgets that end at zero, and what a resume may change about them."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from conftest import run_cli

from bertforge.config import TrainConfig, build
from bertforge.errors import BertforgeError
from bertforge.train.optim import MIN_WARMUP_STEPS, lr_at, progress


def test_warmup_in_steps_is_linear_then_decays_to_zero():
    cfg = TrainConfig(lr=1.0, max_steps=100, warmup_steps=10)
    assert [lr_at(cfg, s, 0.0) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    # After warmup: linear from 1 at step 10 to 0 at step 100.
    assert lr_at(cfg, 55, 0.0) == pytest.approx(0.5)
    assert lr_at(cfg, 100, 0.0) == 0.0


def test_one_warmup_step_is_one_step_not_the_whole_run():
    """The old `warmup: 1.0` was one step; warmup_steps=1 says so unambiguously, and a
    warmup fraction must be below 1."""
    cfg = TrainConfig(lr=1.0, max_steps=10, warmup_steps=1)
    assert lr_at(cfg, 0, 0.0) == 1.0
    with pytest.raises(BertforgeError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.0)
    with pytest.raises(BertforgeError, match="not both"):
        TrainConfig(warmup_steps=5, warmup_fraction=0.1)


def test_warmup_fraction_of_the_run():
    cfg = TrainConfig(lr=1.0, max_steps=100, warmup_fraction=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-3)  # the first update is not zero
    assert lr_at(cfg, 5, 0.0) == pytest.approx(0.5)
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 55, 0.0) == pytest.approx(0.5)


def test_default_warmup_is_a_fraction():
    cfg = TrainConfig()
    assert cfg.warmup_steps is None and cfg.warmup_fraction == 0.06


def test_cosine_and_constant():
    cos = TrainConfig(lr=2.0, max_steps=100, warmup_steps=0, schedule="cosine")
    assert lr_at(cos, 0, 0.0) == pytest.approx(2.0)
    assert lr_at(cos, 50, 0.0) == pytest.approx(1.0)
    assert lr_at(cos, 25, 0.0) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lr_at(cos, 100, 0.0) == pytest.approx(0.0, abs=1e-12)
    const = TrainConfig(lr=2.0, max_steps=100, warmup_steps=4, schedule="constant")
    assert [lr_at(const, s, 0.0) for s in (0, 3, 50, 99)] == pytest.approx([0.5, 2, 2, 2])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_time_budget_reaches_zero_exactly_at_the_deadline(schedule):
    cfg = TrainConfig(lr=1.0, time_budget=60.0, warmup_fraction=0.1, schedule=schedule)
    assert progress(cfg, 10_000, 30.0) == 0.5
    # warmup over the first 6 seconds (and at least MIN_WARMUP_STEPS steps)
    assert lr_at(cfg, 300, 3.0) == pytest.approx(0.5)
    assert lr_at(cfg, 500, 59.999) == pytest.approx(0.0, abs=1e-4)
    assert lr_at(cfg, 500, 60.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(cfg, 500, 75.0) == pytest.approx(0.0, abs=1e-12)  # never negative


def test_with_steps_and_budget_the_nearer_end_wins():
    cfg = TrainConfig(lr=1.0, max_steps=100, time_budget=60.0, warmup_steps=0)
    assert progress(cfg, 50, 6.0) == 0.5
    assert progress(cfg, 10, 45.0) == 0.75


def test_the_old_warmup_key_is_refused():
    with pytest.raises(BertforgeError, match="unknown key 'warmup'"):
        build(TrainConfig, {"warmup": 0.06}, "train")


def test_cli_warmup_flags(tmp_path, data_dir, capsys):
    from bertforge.api import resolve_run_config
    from bertforge.cli.main import build_parser, pretrain_options

    def train(*flags):
        args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", *flags])
        return resolve_run_config(args.preset, args.config, pretrain_options(args))[0].train

    assert train("--warmup-steps", "7").warmup_steps == 7
    assert train("--warmup-steps", "7").warmup_fraction is None
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  warmup_fraction: 0.3\n")
    # a flag wins over the file, whichever form each uses
    assert train("--config", str(yaml_file), "--warmup-steps", "9").warmup_steps == 9
    assert train("--config", str(yaml_file)).warmup_fraction == 0.3


# ------------------------------------------------------------------------- and resumes


def _pretrain(capsys, data_dir, run, *flags):
    return run_cli(
        capsys,
        "pretrain",
        "--data",
        data_dir,
        "--out",
        run,
        "--preset",
        "tiny",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "2",
        "--intermediate-size",
        "128",
        "--max-position-embeddings",
        "64",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--dropout",
        "0",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--quiet",
        *flags,
    )


def _losses(run):
    return [
        json.loads(x)["loss"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]


@pytest.mark.parametrize("flag", [("--max-steps", "6"), ("--time-budget", "1h")])
def test_resume_refuses_to_reshape_a_length_dependent_schedule(tmp_path, data_dir, capsys, flag):
    run = tmp_path / "run"
    assert _pretrain(capsys, data_dir, run, "--max-steps", "3")[0] == 0
    code, _, err = _pretrain(
        capsys, data_dir, run, "--max-steps", "3", flag[0], flag[1], "--resume"
    )
    assert code == 2
    assert "learning rate of the steps to come would change" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_may_lengthen_a_run_whose_schedule_does_not_depend_on_it(tmp_path, data_dir, capsys):
    """Constant after a warmup in steps: the lengthened run is the longer run."""
    schedule = ("--schedule", "constant", "--warmup-steps", "2")
    short, long = tmp_path / "short", tmp_path / "long"
    assert _pretrain(capsys, data_dir, short, *schedule, "--max-steps", "3")[0] == 0
    assert _pretrain(capsys, data_dir, short, *schedule, "--max-steps", "6", "--resume")[0] == 0
    assert _pretrain(capsys, data_dir, long, *schedule, "--max-steps", "6")[0] == 0
    assert _losses(short) == _losses(long) and len(_losses(long)) == 6


class SlowStartClock:
    """Training time that runs slowly at first: `slow_steps` steps of `slow_s` seconds
    each (a busy machine), then `fast_s` seconds a step."""

    def __init__(self, slow_steps: int, slow_s: float, fast_s: float):
        self.slow_steps, self.slow_s, self.fast_s = slow_steps, slow_s, fast_s

    def elapsed(self, step: int) -> float:
        slow = min(step, self.slow_steps)
        return slow * self.slow_s + max(0, step - self.slow_steps) * self.fast_s


def test_a_time_budget_warmup_lasts_at_least_min_warmup_steps_however_slow_the_start():
    # 5% of a 10-minute budget is 30 s; the first 20 steps take 1.5 s each, so the 30 s
    # are gone by step 20. The warmup must still last MIN_WARMUP_STEPS steps.
    cfg = TrainConfig(lr=1e-3, time_budget=600.0, warmup_fraction=0.05)
    clock = SlowStartClock(slow_steps=20, slow_s=1.5, fast_s=0.1)
    lrs = [lr_at(cfg, s, clock.elapsed(s)) for s in range(400)]
    assert clock.elapsed(20) == pytest.approx(30.0)
    assert lrs[19] == pytest.approx(1e-3 * 20 / MIN_WARMUP_STEPS)
    # It rises a step at a time until it meets the decay line (which started at 30 s).
    assert all(b > a for a, b in itertools.pairwise(lrs[:91]))
    assert max(lrs) <= 1e-3 and lrs[MIN_WARMUP_STEPS - 1] == pytest.approx(
        1e-3 * (1 - (clock.elapsed(MIN_WARMUP_STEPS - 1) / 600 - 0.05) / 0.95)
    )
    # No jump where warmup hands over to the decay: the rate changes smoothly throughout.
    assert (
        max(abs(b - a) for a, b in itertools.pairwise(lrs[1:])) <= 1e-3 / MIN_WARMUP_STEPS + 1e-12
    )
    # On a fast machine the fraction is the longer of the two and governs, as before.
    fast = SlowStartClock(slow_steps=0, slow_s=0.0, fast_s=0.01)  # 30 s = 3,000 steps
    assert lr_at(cfg, 1499, fast.elapsed(1499)) == pytest.approx(0.5e-3, rel=1e-3)


def test_an_explicit_zero_warmup_stays_zero_with_a_time_budget():
    cfg = TrainConfig(lr=1.0, time_budget=60.0, warmup_fraction=0.0)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1.0)
