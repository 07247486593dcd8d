"""Stopping and resuming: a stopped or killed run resumes exactly; faults, bad files and bad
checkpoints never lose work; bad configuration fails fast with one line.

Runs are tiny (a 2-layer, 64-wide model, 20 steps of 16 sequences with 4-way gradient
accumulation and dropout on) and single-threaded, so every stop and resume can be
compared bitwise with one uninterrupted reference run. Subprocess runs are slowed by a
sleep per step so that signals and kills land mid-run whatever the machine's speed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli

from bertforge.cli.main import main
from bertforge.config import RunConfig
from bertforge.errors import BertforgeError
from bertforge.tasks.mlm import MLMTask
from bertforge.testing import complete_checkpoints, reference_run_argv, train_records
from bertforge.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20


def argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """The reference run's command line; later flags override earlier ones."""
    return reference_run_argv(data_dir, out, STEPS, *extra)


# `python -c` with this runs the CLI with a sleep before each step.
SLOW_CLI = """
import sys, time
from bertforge.commands import pretrain
from bertforge.cli.main import main
real = pretrain.MLMTask.batch
def slow(self, step):
    time.sleep({delay})
    return real(self, step)
pretrain.MLMTask.batch = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run, with checkpoints at steps 5, 10, 15 and 20."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(argv(data_dir, run, "--checkpoint-every", "5", "--keep-last", "10")) == 0
    return run


def start(args: list[str], delay: float = 0.1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI.format(delay=delay), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train_records(run)]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not train_records(run) or train_records(run)[-1]["step"] < step:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    found = ckpt.find_latest(run / "checkpoints")
    assert found is not None
    return ckpt.load_weights(found[0])


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise the same per-step losses and final weights."""
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    assert losses(run) == losses(reference)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- 1, 5: signals, exact resume


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_resume_is_exact(
    tmp_path, data_dir, reference, capsys, sig, status
):
    run = tmp_path / "run"
    proc = start(argv(data_dir, run, "--checkpoint-every", "0"))  # only the signal saves
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "checkpoint saved, continue with --resume" in err
    last = train_records(run)[-1]
    stopped = last["step"]
    assert 3 <= stopped < STEPS and 0 < last["epoch"] < 1  # mid-run, mid-epoch
    assert complete_checkpoints(run) == [f"step-{stopped:06d}"]

    code, _, err = run_cli(capsys, *argv(data_dir, run, "--resume"))  # the same command again
    assert code == 0, err
    assert f"resuming from step-{stopped:06d}" in err
    assert_same_run(run, reference)


# ---------------------------------------------------------------- 2: kill -9 at any moment


@pytest.mark.slow
def test_kill_9_twice_then_resume_is_exact(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    rng = random.Random(0)
    extra = ["--checkpoint-every", "1", "--keep-last", "2"]
    last = 0
    for attempt in range(2):
        newest = complete_checkpoints(run)[-1:] if attempt else []
        proc = start(argv(data_dir, run, *extra, *(["--resume"] if attempt else [])), delay=0.03)
        wait_for_step(run, last + 2, proc)
        time.sleep(rng.uniform(0, 0.06))  # anywhere in a step, its checkpoint write included
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        if newest:
            assert f"resuming from {newest[0]}" in err
        last = train_records(run)[-1]["step"]
    newest = complete_checkpoints(run)[-1]
    code, _, err = run_cli(capsys, *argv(data_dir, run, *extra, "--resume"))
    assert code == 0, err
    assert f"resuming from {newest}" in err
    assert_same_run(run, reference)


# ---------------------------------------------------------------- 3: atomic checkpoints


def _tiny_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(ckpt_dir: Path, step: int, keep_last: int = 3) -> Path:
    model, opt = _tiny_state()
    return ckpt.save_checkpoint(
        ckpt_dir, step, ckpt.model_state(model), opt.state_dict(), {"tokens": step}, keep_last
    )


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_checkpoint_is_fsynced_renamed_then_pointed_to(tmp_path, monkeypatch):
    d = tmp_path.resolve() / "checkpoints"  # as /proc names it
    _save(d, 1)
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        if Path(dst).name == "latest":  # at this moment the new checkpoint must be complete
            events.append(
                ("verified", ckpt.verify(d / "step-000002")["step"], (d / "step-000001").exists())
            )
        real_replace(src, dst)
        events.append(("replace", Path(src).name, Path(dst).name))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save(d, 2, keep_last=1)
    monkeypatch.undo()

    def at(event: tuple) -> int:
        return events.index(event)

    tmp = str(d / ".step-000002.tmp")
    renamed = at(("replace", ".step-000002.tmp", "step-000002"))
    for f in ("model.safetensors", "optimizer.pt", ".state.json.tmp"):
        assert at(("fsync", f"{tmp}/{f}")) < renamed, f
    assert at(("fsync", tmp)) < renamed  # the temporary directory's entries too
    assert at(("fsync", str(d))) > renamed  # the rename itself
    # `latest` moves after the rename, when step 2 verifies and step 1 still exists
    assert at(("verified", 2, True)) > renamed
    assert at(("replace", ".latest.tmp", "latest")) > at(("verified", 2, True))
    assert (d / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step-000002"]  # pruned after


class Crash(BaseException):
    """Stands for a kill -9: nothing after it runs, no cleanup."""


def test_crash_at_every_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    d0 = tmp_path / "base"
    _save(d0, 1)
    n, point = 0, 0
    real_fsync, real_replace = os.fsync, os.replace

    def counting(real):
        def wrapper(*args):
            nonlocal n
            n += 1
            if n == point:
                raise Crash
            return real(*args)

        return wrapper

    monkeypatch.setattr(os, "fsync", counting(real_fsync))
    monkeypatch.setattr(os, "replace", counting(real_replace))
    seen = set()
    for point in range(1, 100):
        n = 0
        d = tmp_path / f"crash{point}"
        shutil.copytree(d0, d)
        try:
            _save(d, 2, keep_last=1)
        except Crash:
            pass
        else:
            break  # `point` is past the last fsync/rename of a save
        _path, state = ckpt.find_latest(d)
        expected = 2 if (d / "step-000002").exists() else 1  # a rename is all or nothing
        assert state["step"] == expected, point
        assert (d / "latest").read_text().strip() in ("step-000001", "step-000002")
        seen.add(expected)
        _save(d, 3, keep_last=1)  # the next save cleans up whatever the crash left
        assert sorted(p.name for p in d.iterdir()) == ["latest", "step-000003"]
    assert point > 5 and seen == {1, 2}


def test_keep_last_is_numeric_and_keeps_the_newest(tmp_path):
    d = tmp_path / "checkpoints"
    for step in range(1, 6):
        _save(d, step, keep_last=2)
    assert sorted(p.name for p in d.glob("step-*")) == ["step-000004", "step-000005"]
    _save(d, 999_999, keep_last=2)
    _save(d, 1_000_000, keep_last=2)  # sorts before step-999999 as text
    assert sorted(p.name for p in d.glob("step-*")) == ["step-1000000", "step-999999"]
    (d / "latest").unlink()
    assert ckpt.find_latest(d)[1]["step"] == 1_000_000


def test_state_json_records_a_verified_checksum_of_every_file(tmp_path):
    path = _save(tmp_path / "checkpoints", 7)
    state = json.loads((path / "state.json").read_text())
    assert set(state["checksums"]) == {"model.safetensors", "optimizer.pt"}
    assert ckpt.verify(path)["step"] == 7
    unsealed = {k: v for k, v in state.items() if k != "state_sha256"}
    (path / "state.json").write_text(json.dumps(unsealed))
    with pytest.raises(BertforgeError, match=r"state.json: checksum mismatch"):
        ckpt.verify(path)
    state["step"] = 8  # a plausible-looking edit of state.json itself is caught
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(BertforgeError, match=r"state.json: checksum mismatch"):
        ckpt.verify(path)


# ---------------------------------------------------------------- 4: corruption


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x04  # one bit
        path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, reference, capsys, how, name):
    d = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", d)
    target = d / "step-000020" / name
    _damage(target, how)
    path, state = ckpt.find_latest(d)
    assert path.name == "step-000015" and state["step"] == 15
    assert f"warning: skipping checkpoint: {target}:" in capsys.readouterr().err


def test_resume_falls_back_past_damaged_checkpoints(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _damage(run / "checkpoints" / "step-000020" / "model.safetensors", "truncate")
    _damage(run / "checkpoints" / "step-000015" / "optimizer.pt", "bitflip")
    code, _, err = run_cli(capsys, *argv(data_dir, run, "--resume"))
    assert code == 0, err
    assert "step-000020/model.safetensors: checksum mismatch" in err
    assert "step-000015/optimizer.pt: checksum mismatch" in err
    assert "resuming from step-000010" in err
    assert_same_run(run, reference)  # and the damaged steps were rewritten
    assert complete_checkpoints(run) == [f"step-{s:06d}" for s in (5, 10, 15, 20)]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)  # as if killed while writing the first checkpoint:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    partial = run / "checkpoints" / ".step-000005.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    code, _, err = run_cli(capsys, *argv(data_dir, run, "--resume"))
    assert code == 0, err
    assert "starting from step 0" in err
    assert_same_run(run, reference)
    assert not partial.exists()


def test_resume_with_every_checkpoint_damaged_is_refused(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for d in (run / "checkpoints").glob("step-*"):
        _damage(d / "model.safetensors", "bitflip")
    code, _, err = run_cli(capsys, *argv(data_dir, run, "--resume"))
    assert code == 2
    assert "no checkpoint in" in error_line(err) and "verifies" in error_line(err)
    assert len(list((run / "checkpoints").glob("step-*"))) == 4  # nothing overwritten


# ---------------------------------------------------------------- 6: disk full


def test_disk_full_while_saving(tmp_path, data_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    real, calls = ckpt.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint (step 4)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    args = argv(data_dir, run, "--checkpoint-every", "2", "--max-steps", "6")
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    line = error_line(err)
    assert "step-000004" in line and os.strerror(errno.ENOSPC) in line
    assert "previous checkpoint is untouched" in line
    d = run / "checkpoints"
    assert (d / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step-000002"]  # no partial
    assert ckpt.verify(d / "step-000002")["step"] == 2
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0 and "resuming from step-000002" in err


# ---------------------------------------------------------------- 7: non-finite loss


def _poison(monkeypatch, step: int) -> None:
    """Make one micro-batch (the second of four) of `step` return a NaN loss."""
    real, calls = MLMTask.loss_sum, []

    def loss_sum(self, model, micro):
        calls.append(1)
        losses, extra = real(self, model, micro)
        if len(calls) == (step - 1) * 4 + 2:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, extra

    monkeypatch.setattr(MLMTask, "loss_sum", loss_sum)


def test_nan_stops_without_a_checkpoint_after_it(tmp_path, data_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison(monkeypatch, 3)
    code, _, err = run_cli(
        capsys,
        *argv(data_dir, run, "--max-steps", "6", "--checkpoint-every", "1", "--keep-last", "10"),
    )
    assert code == 2
    line = error_line(err)
    assert "non-finite loss (nan) at step 3" in line and "--on-nan skip" in line
    assert complete_checkpoints(run) == ["step-000001", "step-000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert [r["step"] for r in train_records(run)] == [1, 2]


def test_nan_skip_drops_the_update_and_counts_it(tmp_path, data_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison(monkeypatch, 3)
    code, _, err = run_cli(
        capsys,
        *argv(
            data_dir,
            run,
            "--max-steps",
            "6",
            "--on-nan",
            "skip",
            "--checkpoint-every",
            "1",
            "--keep-last",
            "10",
        ),
    )
    assert code == 0, err
    assert "step 3: non-finite loss (nan); update skipped (1 so far)" in err
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2]["skipped"] is True and records[2]["loss"] is None
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] is not None for r in records if r["step"] != 3)
    d = run / "checkpoints"
    before, after = ckpt.load_weights(d / "step-000002"), ckpt.load_weights(d / "step-000003")
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at step 3
    assert json.loads((d / "step-000006" / "state.json").read_text())["skipped_steps"] == 1


def _defer_reads(monkeypatch) -> None:
    """The GPU path on the CPU: steps' figures read only where the host needs them."""
    import bertforge.train.loop as train

    monkeypatch.setattr(train, "defer_host_reads", lambda device: True)


@pytest.mark.parametrize("deferred", [False, True])
def test_nan_found_late_still_stops_before_the_next_checkpoint(
    tmp_path, data_dir, capsys, monkeypatch, deferred
):
    """Read at step 4 (a checkpoint), the NaN of step 3 stops the run naming step 3."""
    if deferred:
        _defer_reads(monkeypatch)
    run = tmp_path / "run"
    _poison(monkeypatch, 3)
    code, _, err = run_cli(
        capsys,
        *argv(data_dir, run, "--max-steps", "6", "--log-every", "10", "--checkpoint-every", "4"),
    )
    assert code == 2
    assert "non-finite loss (nan) at step 3" in error_line(err)
    assert complete_checkpoints(run) == []
    assert [r["step"] for r in train_records(run)] == [1]


def test_nan_skip_deferred_drops_the_update_and_counts_it(tmp_path, data_dir, capsys, monkeypatch):
    _defer_reads(monkeypatch)
    run = tmp_path / "run"
    _poison(monkeypatch, 3)
    code, _, err = run_cli(
        capsys,
        *argv(
            data_dir,
            run,
            "--max-steps",
            "6",
            "--on-nan",
            "skip",
            "--log-every",
            "2",
            "--checkpoint-every",
            "2",
        ),
    )
    assert code == 0, err
    assert "step 3: non-finite loss (nan); update skipped (1 so far)" in err
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6]
    assert records[2]["skipped"] is True and records[2]["loss"] is None
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    d = run / "checkpoints"
    assert json.loads((d / "step-000006" / "state.json").read_text())["skipped_steps"] == 1


# ---------------------------------------------------------------- 8: mismatched resume


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, corpus_file, tokenizer_dir) -> dict[str, Path]:
    """Data with another sequence length, and data made by another tokenizer."""
    from bertforge.data.prepare import prepare
    from bertforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    prepare(
        [str(corpus_file)],
        tokenizer_dir,
        root / "seq64",
        seq_len=64,
        valid_fraction=0.05,
        show_progress=False,
    )
    train_tokenizer([str(corpus_file)], root / "tok", vocab_size=150, show_progress=False)
    prepare(
        [str(corpus_file)],
        root / "tok",
        root / "othertok",
        seq_len=32,
        valid_fraction=0.05,
        show_progress=False,
    )
    (root / "wider.yaml").write_text("model:\n  intermediate_size: 256\n")
    return {"seq64": root / "seq64", "othertok": root / "othertok", "yaml": root / "wider.yaml"}


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--hidden-size", "128"], "model.hidden_size was 64"),
        (["--preset", "mini"], "model.num_hidden_layers was 2"),
        (["--config", "{yaml}"], "model.intermediate_size was 128"),
        (["--dropout", "0.2"], "model.hidden_dropout_prob was 0.1"),
        (["--batch-size", "32"], "train.batch_size was 16"),
        (["--seq-len", "64"], "data.seq_len was 32"),
        (["--data", "{seq64}"], "data.seq_len:"),
        (["--data", "{othertok}"], "data.tokenizer_hash:"),
    ],
)
def test_mismatched_resume_is_refused(tmp_path, reference, other_data, capsys, extra, field):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "config.yaml").read_text()
    extra = [x.format(**other_data) for x in extra]
    code, _, err = run_cli(capsys, "pretrain", "--out", str(run), "--resume", "--quiet", *extra)
    assert code == 2
    assert field in error_line(err)
    assert (run / "config.yaml").read_text() == before


def test_resume_with_the_same_command_and_config_file_is_accepted(tmp_path, data_dir, capsys):
    run, yaml_file = tmp_path / "run", tmp_path / "run.yaml"
    yaml_file.write_text(
        "model:\n  hidden_size: 64\n  num_attention_heads: 2\ntrain:\n  lr: 1e-4\n  batch_size: 8\n"
    )  # 1e-4: a string to PyYAML
    args = [
        "pretrain",
        "--data",
        str(data_dir),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--config",
        str(yaml_file),
        "--seq-len",
        "32",
        "--max-position-embeddings",
        "64",
        "--schedule",
        "constant",
        "--warmup-steps",
        "1",
        "--quiet",
    ]
    assert run_cli(capsys, *args, "--max-steps", "2")[0] == 0
    code, _, err = run_cli(capsys, *args, "--max-steps", "3", "--resume")
    assert code == 0, err
    assert "resuming from step-000002" in err


def test_tokenizer_hash_is_recorded(reference, data_dir):
    saved = RunConfig.load(reference / "config.yaml")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert saved.data.tokenizer_hash == manifest["tokenizer_hash"]


# ---------------------------------------------------------------- 9: safe loading


class _Planted:
    """Unpickling this calls Path.touch: what a planted optimizer.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_planted_pickle_is_refused_and_never_runs(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "pwned"
    step = run / "checkpoints" / "step-000020"
    torch.save({"state": {}, "param_groups": [], "x": _Planted(marker)}, step / "optimizer.pt")
    state = json.loads((step / "state.json").read_text())
    state["checksums"]["optimizer.pt"] = hashlib.sha256(
        (step / "optimizer.pt").read_bytes()
    ).hexdigest()
    ckpt.write_state(step, state)  # the checksums agree: only the unpickling stands in the way
    assert ckpt.verify(step)["step"] == 20

    code, _, err = run_cli(capsys, *argv(data_dir, run, "--resume"))
    assert code == 2
    line = error_line(err)
    assert "step-000020/optimizer.pt: refused to load" in line
    assert not marker.exists()
    torch.load(step / "optimizer.pt", weights_only=False)  # the payload is live:
    assert marker.exists()  # without weights_only it would have run


# ---------------------------------------------------------------- 11: bad configuration


@pytest.mark.parametrize(
    "yaml_text, flags, match",
    [
        ("train:\n  lrr: 0.1\n", [], "train: unknown key 'lrr'"),
        ("train:\n  batch_size: big\n", [], "train.batch_size: expected int, got 'big'"),
        ("train:\n  lr: -0.001\n", [], "TrainConfig.lr=-0.001: must be > 0"),
        ("data:\n  mask_rate: 1.5\n", [], "DataConfig.mask_rate=1.5: must be in (0, 1]"),
        ("optimizer:\n  lr: 0.1\n", [], "unknown section 'optimizer'"),
        (None, ["--lr", "-1"], "argument --lr: '-1': must be > 0"),
        (None, ["--mask-rate", "1.5"], "argument --mask-rate: '1.5': must be in (0, 1]"),
        (None, ["--batch-size", "1.5"], "argument --batch-size: invalid int value"),
        (
            None,
            ["--on-nan", "sometimes"],
            "TrainConfig.on_nan='sometimes': must be 'stop' or 'skip'",
        ),
        (
            None,
            ["--seq-len", "128", "--max-position-embeddings", "64"],
            "data.seq_len 128 exceeds model.max_position_embeddings 64",
        ),
    ],
)
def test_bad_configuration_is_one_line_exit_2_before_any_work(
    tmp_path, corpus_file, capsys, yaml_text, flags, match
):
    args = [
        "pretrain",
        "--corpus",
        str(corpus_file),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--quiet",
        *flags,
    ]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert match in error_line(err)
    assert not (tmp_path / "run").exists()  # no tokenizer trained, nothing written


def test_yaml_exponent_floats_are_numbers():
    # PyYAML reads 1e-4 (no dot) as a string; a config file should still mean 0.0001
    assert RunConfig.from_dict({"train": {"lr": "1e-4"}}).train.lr == 1e-4
