"""TensorBoard and W&B tracking: what they hold equals metrics.jsonl, resumes continue them,
a missing package is one line naming the extra, and runs without them import neither.

W&B runs offline here (WANDB_MODE=offline) with all of its files under a temporary
directory; its .wandb transaction log is read back with the small reader below.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli, tiny_run_config

from bertforge.commands.pretrain import run_pretrain
from bertforge.config import TrainConfig
from bertforge.errors import BertforgeError
from bertforge.train.tracking import (
    WANDB_STATE,
    _reachable,
    _wandb_mode,
    check_available,
    open_trackers,
    scalars,
)

TRAIN_KEYS = ["loss", "lr", "grad_norm", "tokens_per_s"]


def metrics(run: Path, kind: str) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == kind}


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event TensorBoard shows for `tag`, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def wandb_records(path: Path):
    """The protobuf Records of a .wandb transaction log: LevelDB's log format, a 7-byte
    file header and then 32 KiB blocks of chunks, each behind a 7-byte header (crc32,
    length, type: 1 a whole record, 2/3/4 its first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb(offline_run: Path) -> tuple[dict[int, dict], dict]:
    """({step: the history row logged at it}, the run's config) of an offline run."""

    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    [log] = offline_run.glob("*.wandb")
    history, config = {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
    return history, config


@pytest.fixture(scope="module")
def wandb_offline(tmp_path_factory):
    """W&B offline, its caches, settings and logs under a temporary directory; the same
    for every test (W&B reads its environment once per process)."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for var in (
            "WANDB_DIR",
            "WANDB_CACHE_DIR",
            "WANDB_CONFIG_DIR",
            "WANDB_DATA_DIR",
            "WANDB_ARTIFACT_DIR",
        ):
            mp.setenv(var, str(home / var.lower()))
        yield home
        import wandb

        wandb.teardown()  # stops W&B's service process


def next_second() -> None:
    """Wait for the next second on the wall clock: event files and W&B's offline runs are
    named by the second they are opened in, and are read in name order."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_scalars_keep_numbers_only():
    record = {
        "kind": "eval",
        "step": 3,
        "tokens": 96,
        "mlm_loss": 2.5,
        "precision": "bf16",
        "loss": None,
        "skipped": True,
    }
    assert scalars(record) == {"eval/tokens": 96.0, "eval/mlm_loss": 2.5}


def test_tensorboard_holds_what_metrics_jsonl_holds(tmp_path, data_dir):
    run = tmp_path / "run"
    cfg = tiny_run_config(max_steps=6, eval_every=3, log_every=1)
    cfg.train.tensorboard = True
    run_pretrain(run, cfg, data_dir=data_dir, show_progress=False)
    train, evals = metrics(run, "train"), metrics(run, "eval")
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [3, 6]
    for key in TRAIN_KEYS:
        events = tensorboard_scalars(run, f"train/{key}")
        assert [s for s, _ in events] == sorted(train), key
        assert dict(events) == pytest.approx({s: r[key] for s, r in train.items()}, rel=1e-6)
    for key in ("mlm_loss", "mlm_accuracy", "perplexity"):
        events = tensorboard_scalars(run, f"eval/{key}")
        assert dict(events) == pytest.approx({s: r[key] for s, r in evals.items()}, rel=1e-6)
    with pytest.raises(KeyError):  # a string is no scalar
        tensorboard_scalars(run, "eval/precision")


def test_wandb_offline_run_holds_metrics_and_config(tmp_path, data_dir, wandb_offline, capfd):
    run = tmp_path / "run"
    cfg = tiny_run_config(max_steps=6, eval_every=3, log_every=1)
    cfg.train.wandb = "bertforge-test"
    run_pretrain(run, cfg, data_dir=data_dir, show_progress=False)
    out, err = capfd.readouterr()
    assert out == ""  # W&B stays off stdout (the CLI's last stdout line is its result)
    [offline] = run.glob("wandb/offline-run-*")
    run_id = json.loads((run / WANDB_STATE).read_text())["id"]
    assert offline.name.endswith(f"-{run_id}")
    assert [x for x in err.splitlines() if "wandb sync" in x] == [
        (
            f"W&B: logging offline (WANDB_MODE=offline); upload the run later with: "
            f"wandb sync {offline}"
        )
    ]
    history, config = read_wandb(offline)
    train, evals = metrics(run, "train"), metrics(run, "eval")
    assert sorted(history) == sorted(train)
    for key in TRAIN_KEYS:
        assert {s: h[f"train/{key}"] for s, h in history.items()} == pytest.approx(
            {s: r[key] for s, r in train.items()}
        )
    assert {
        s: h["eval/mlm_loss"] for s, h in history.items() if "eval/mlm_loss" in h
    } == pytest.approx({s: r["mlm_loss"] for s, r in evals.items()})
    assert not any("eval/precision" in h for h in history.values())
    assert config["model"]["hidden_size"] == 64
    assert config["train"]["max_steps"] == 6 and config["train"]["wandb"] == "bertforge-test"


def test_resume_continues_both_trackers(tmp_path, data_dir, wandb_offline):
    """A run killed after step 4 resumes from its step-2 checkpoint: TensorBoard shows each
    step once, with the resumed values; W&B continues the same run and skips the steps
    it has already."""
    first, second = tmp_path / "first", tmp_path / "second"
    cfg = tiny_run_config(max_steps=4, checkpoint_every=2, eval_every=2, log_every=1)
    cfg.train.tensorboard, cfg.train.wandb = True, "bertforge-test"
    run_pretrain(first, cfg, data_dir=data_dir, show_progress=False)
    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoints" / "step-000004")  # as if killed after step 4
    next_second()
    run_pretrain(second, cfg, data_dir=data_dir, resume=True, show_progress=False)
    train = metrics(second, "train")
    assert sorted(train) == [1, 2, 3, 4]
    for key in TRAIN_KEYS:
        events = tensorboard_scalars(second, f"train/{key}")
        assert [s for s, _ in events] == [1, 2, 3, 4], key  # the killed attempt's 3, 4 purged
        assert dict(events) == pytest.approx({s: r[key] for s, r in train.items()}, rel=1e-6)
    assert dict(tensorboard_scalars(second, "eval/mlm_loss")) == pytest.approx(
        {s: r["mlm_loss"] for s, r in metrics(second, "eval").items()}, rel=1e-6
    )
    run_id = json.loads((second / WANDB_STATE).read_text())["id"]
    assert run_id == json.loads((first / WANDB_STATE).read_text())["id"]
    attempts = sorted(second.glob("wandb/offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)
    assert [s for a in attempts for s in sorted(read_wandb(a)[0])] == [1, 2, 3, 4]


def test_a_failed_run_closes_its_wandb_run(tmp_path, data_dir, wandb_offline, capsys):
    """An error in training still finishes the W&B run, marked failed (exit code 1), so the
    next run in the process starts its own; a run the caller opened is refused."""
    import wandb

    from bertforge.train import loop as train
    from bertforge.train import tracking

    calls, exit_codes = [], []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a failure in the second step")
        return real(*args, **kwargs)

    def finish(self, failed=False):
        exit_codes.append(1 if failed else 0)
        real_close(self, failed)

    real, real_close = train.train_step, tracking._WandB.close
    cfg = tiny_run_config(max_steps=4, eval_every=0)
    cfg.train.wandb = "bertforge-test"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_step", failing)
        mp.setattr(tracking._WandB, "close", finish)
        with pytest.raises(RuntimeError, match="second step"):
            run_pretrain(tmp_path / "a", cfg, data_dir=data_dir, show_progress=False)
    assert exit_codes == [1] and wandb.run is None
    after = tiny_run_config(max_steps=1, eval_every=0)
    after.train.wandb = "bertforge-test"
    run_pretrain(tmp_path / "b", after, data_dir=data_dir, show_progress=False)
    ids = [json.loads((tmp_path / r / WANDB_STATE).read_text())["id"] for r in "ab"]
    assert ids[0] != ids[1] and wandb.run is None  # the next run had a W&B run of its own
    theirs = wandb.init(
        project="theirs",
        dir=str(tmp_path),
        mode="offline",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        (tmp_path / "c").mkdir()
        with pytest.raises(BertforgeError, match="already active"):
            open_trackers(tmp_path / "c", TrainConfig(wandb="x"), None, "pretrain")
    finally:
        theirs.finish()


def test_fine_tuning_logs_to_tensorboard_too(tmp_path, data_dir, capsys):
    from conftest import write_sst2

    run = tmp_path / "pre"
    run_pretrain(
        run, tiny_run_config(max_steps=2, eval_every=0), data_dir=data_dir, show_progress=False
    )
    out = tmp_path / "ft"
    code, _, err = run_cli(
        capsys,
        "finetune",
        run,
        "--task",
        "sst2",
        "--data-dir",
        write_sst2(tmp_path / "SST-2"),
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--log-every",
        "1",
        "--tensorboard",
        "--quiet",
    )
    assert code == 0, err
    expected = metrics(out, "train")
    assert [s for s, _ in tensorboard_scalars(out, "train/loss")] == sorted(expected)
    assert [v for _, v in tensorboard_scalars(out, "train/loss")] == pytest.approx(
        [expected[s]["loss"] for s in sorted(expected)], rel=1e-6
    )
    assert [s for s, _ in tensorboard_scalars(out, "eval/accuracy")] == [8]


def test_close_twice_and_log_after_close(tmp_path):
    trackers = open_trackers(tmp_path, TrainConfig(tensorboard=True), None, "pretrain")
    trackers.log({"kind": "train", "step": 1, "loss": 2.0})
    trackers.close()
    trackers.close()
    trackers.log({"kind": "train", "step": 2, "loss": 1.0})
    assert [s for s, _ in tensorboard_scalars(tmp_path, "train/loss")] == [1]


@pytest.mark.parametrize(
    "flag,modules",
    [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]), ("wandb", ["wandb"])],
)
def test_missing_package_names_the_extra(monkeypatch, flag, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    check_available(TrainConfig())  # not asked for: not imported
    cfg = TrainConfig(tensorboard=True) if flag == "tensorboard" else TrainConfig(wandb="p")
    with pytest.raises(BertforgeError) as e:
        check_available(cfg)
    assert str(e.value) == (f"--{flag} needs the {flag} package: pip install 'bertforge[{flag}]'")


def test_cli_missing_tensorboard_is_one_line_and_exit_2(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, out, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--seq-len",
        "32",
        "--tensorboard",
        "--quiet",
    )
    assert code == 2 and out == ""
    assert err.splitlines() == [
        (
            "bertforge: error: --tensorboard needs the tensorboard "
            "package: pip install 'bertforge[tensorboard]'"
        )
    ]


def test_run_without_flags_imports_neither(tmp_path, data_dir):
    """In a fresh process: other tests here import both packages."""
    assert open_trackers(tmp_path, TrainConfig(), None, "pretrain") is None
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from conftest import tiny_run_config\n"
        "from bertforge.commands.pretrain import run_pretrain\n"
        f"run_pretrain(Path({str(tmp_path / 'run')!r}), tiny_run_config(max_steps=2),\n"
        f"             data_dir=Path({str(data_dir)!r}), show_progress=False)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard')\n"
        "          or m.startswith('torch.utils.tensorboard')]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_wandb_mode_is_decided_without_prompt_or_wait(monkeypatch):
    logged_in = SimpleNamespace(login=lambda prompt, verify: True)
    no_key = SimpleNamespace(login=lambda prompt, verify: False)
    reached = []
    monkeypatch.setattr(
        "bertforge.train.tracking._reachable",
        lambda host, port: reached.append((host, port)) or True,
    )
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode(logged_in) == ("disabled", "")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _wandb_mode(logged_in) == ("offline", "WANDB_MODE=offline")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert _wandb_mode(logged_in) == ("online", "")
    mode, why = _wandb_mode(no_key)
    assert mode == "offline" and "wandb login" in why
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    assert _wandb_mode(logged_in) == ("online", "")
    assert reached == [("api.wandb.ai", 443)] * 2 + [("localhost", 8080)]
    monkeypatch.setattr("bertforge.train.tracking._reachable", lambda host, port: False)
    assert _wandb_mode(logged_in) == ("offline", "localhost cannot be reached")


def test_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert _reachable("127.0.0.1", server.getsockname()[1])
    start = time.monotonic()
    assert not _reachable("no-such-host.invalid", 443, timeout=1.0)
    assert time.monotonic() - start < 1.5
