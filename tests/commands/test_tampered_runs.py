"""Hostile and unlucky runs: bad values, tampered checkpoints and model directories, a full
disk, two commands on one directory, signals during evaluation.

"Sealed" below means that the checksums in a checkpoint's state.json were recomputed after
the tampering, as anyone who can write to the run directory could: the checksums then
pass, and only the checks on the content stand in the way. Each case must end in one
line on stderr and exit status 2 (never a traceback), with nothing lost or left behind;
no planted code may run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_line, reseal, run_cli, tiny_run_config
from conftest import tiny_pretrain_argv as pretrain
from safetensors.torch import save_file

from bertforge.commands.pretrain import run_pretrain
from bertforge.config import preset
from bertforge.errors import BertforgeError
from bertforge.hf import export_model, model_config_from_hf
from bertforge.model.bert import BertForPreTraining
from bertforge.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_copy(tmp_path, one_step_run) -> Path:
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    return run


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` and its content: what a failed command must not change."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------- 14: values that are not finite


@pytest.mark.parametrize(
    "flags, yaml_text, match",
    [
        (["--lr", "inf"], None, "argument --lr: 'inf': must be a finite number"),
        (["--lr", "nan"], None, "argument --lr: 'nan': must be a finite number"),
        (["--grad-clip", "inf"], None, "argument --grad-clip: 'inf': must be a finite number"),
        (["--mask-rate", "nan"], None, "argument --mask-rate: 'nan': must be a finite number"),
        ([], "train:\n  time_budget: .inf\n", "TrainConfig.time_budget=inf: must be a finite"),
        (
            [],
            "model:\n  layer_norm_eps: .nan\n",
            "ModelConfig.layer_norm_eps=nan: must be a finite",
        ),
    ],
)
def test_a_value_that_is_not_finite_is_refused_before_any_work(
    tmp_path, data_dir, capsys, flags, yaml_text, match
):
    args = pretrain(data_dir, tmp_path / "run", *flags)
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args += ["--config", tmp_path / "c.yaml"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert match in error_line(err)
    assert not (tmp_path / "run").exists()


def test_weights_that_are_not_finite_are_never_checkpointed_nor_exported(tmp_path, data_dir):
    """lr=inf (past the config's own check) makes the first update write NaN and infinity
    into the weights; with on_nan skip every later step is skipped and the run would end
    "well", exporting them."""
    cfg = tiny_run_config(max_steps=3, checkpoint_every=1, on_nan="skip", eval_every=0)
    cfg.train.lr = float("inf")
    run = tmp_path / "run"
    with pytest.raises(
        BertforgeError,
        match=r"not saving checkpoint step-000001: weight "
        r"\S+ is not finite",
    ):
        run_pretrain(run, cfg, data_dir=data_dir, show_progress=False)
    assert not list(run.glob("checkpoints/*"))  # no checkpoint, no partial one either
    assert not (run / "hf").exists()


def test_an_export_of_weights_that_are_not_finite_is_refused(tmp_path):
    model = BertForPreTraining(preset("tiny", vocab_size=100, max_position_embeddings=16))
    with torch.no_grad():
        model.bert.layers[1].ffn_out.weight[0, 0] = float("nan")
    with pytest.raises(
        BertforgeError,
        match=r"not exporting to .*: weight bert.layers.1.ffn_out.weight is not finite",
    ):
        export_model(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -------------------------------------------------------------- 15: models that cannot fit


def hf_copy(tmp_path: Path, hf_dir: Path, **config: object) -> Path:
    """A copy of `hf_dir` with `config` written over its config.json."""
    out = tmp_path / "model"
    shutil.copytree(hf_dir, out)
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, **config}))
    return out


def model_commands(
    model: Path, tmp_path: Path, data_dir: Path, task: list[object]
) -> dict[str, list[object]]:
    """The commands that build a model from a model directory."""
    return {
        "fill-mask": ["fill-mask", model, "the [MASK] sees the dog"],
        "finetune": ["finetune", model, *task, "--out", tmp_path / "ft"],
        "pretrain --init": [
            "pretrain",
            "--init",
            model,
            "--data",
            data_dir,
            "--out",
            tmp_path / "init-run",
            "--max-steps",
            "1",
            "--quiet",
        ],
    }


@pytest.mark.parametrize("command", ["fill-mask", "finetune", "pretrain --init"])
def test_a_model_too_large_for_memory_is_refused_before_allocating(
    tmp_path, hf_dir, data_dir, classification_files, capsys, command
):
    model = hf_copy(tmp_path, hf_dir, hidden_size=10**9)  # 192 x 10^9 embedding rows alone
    argv = model_commands(model, tmp_path, data_dir, classification_files)[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    line = error_line(err)
    assert "parameters (hidden_size 1000000000," in line and "GB" in line
    assert not (tmp_path / "ft").exists() and not (tmp_path / "init-run").exists()


def test_a_million_layers_are_refused_without_building_one():
    """(Building them would allocate layer after layer until the machine runs out.)"""
    raw = {**dataclasses.asdict(preset("tiny")), "num_hidden_layers": 10**6}
    with pytest.raises(
        BertforgeError,
        match=r"ModelConfig: [\d,]+ parameters .*"
        r"num_hidden_layers 1000000.* GB",
    ):
        model_config_from_hf(raw)


@pytest.mark.parametrize(
    "config",
    [
        preset("tiny"),
        preset("base"),
        preset(
            "mini",
            vocab_size=150,
            intermediate_size=100,
            type_vocab_size=3,
            max_position_embeddings=40,
        ),
    ],
)
def test_the_parameter_count_is_the_models(config):
    model = BertForPreTraining(config)
    assert config.num_parameters == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------ 16a: a full disk mid-checkpoint

LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from bertforge.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_resume_works(
    tmp_path, data_dir, capsys
):
    """Files may grow to 200 kB: the data can be read and config.yaml written, but not the
    1.8 MB model.safetensors of a checkpoint."""
    run = tmp_path / "run"
    argv = [str(a) for a in pretrain(data_dir, run)]
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED_CLI.format(limit=200_000), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert "could not write checkpoint" in line and "step-000001: File too large" in line
    assert list((run / "checkpoints").iterdir()) == []  # no partial checkpoint left
    assert not (run / ".lock").exists()

    code, _, err = run_cli(capsys, *pretrain(data_dir, run, "--resume"))
    assert code == 0, err
    assert "starting from step 0" in err
    assert ckpt.find_latest(run / "checkpoints")[1]["step"] == 2


def test_resume_removes_partial_checkpoints_first(tmp_path, run_copy, data_dir, capsys):
    """A kill mid-save leaves a .tmp directory; on a full disk it would stop the resume
    from writing anything."""
    partial = run_copy / "checkpoints" / ".step-000002.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    code, _, err = run_cli(capsys, *pretrain(data_dir, run_copy, "--max-steps", "1", "--resume"))
    assert code == 0, err
    assert not partial.exists()


# ---------------------------------------------------------- 17: two commands, one directory

HOLDER = """
import sys
from pathlib import Path
from bertforge.fileio import hold_lock
with hold_lock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def hold(lock: Path) -> subprocess.Popen:
    """Another process holding `lock` (through the same helper) until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("command", ["pretrain", "pretrain --resume", "finetune", "prepare"])
def test_a_second_command_on_a_directory_in_use_is_refused(
    tmp_path,
    data_dir,
    one_step_run,
    tokenizer_dir,
    corpus_file,
    classification_files,
    capsys,
    command,
):
    out = tmp_path / "out"
    argv, lock = {
        "pretrain": (pretrain(data_dir, out), out / ".lock"),
        "pretrain --resume": (
            pretrain(data_dir, out, "--max-steps", "1", "--resume"),
            out / ".lock",
        ),
        "finetune": (
            ["finetune", one_step_run, *classification_files, "--out", out],
            out / ".lock",
        ),
        "prepare": (
            [
                "prepare",
                corpus_file,
                "--tokenizer",
                tokenizer_dir,
                "--out",
                out,
                "--seq-len",
                "32",
                "--quiet",
            ],
            tmp_path / ".out.lock",
        ),
    }[command]
    if command == "pretrain --resume":
        shutil.copytree(one_step_run, out)
    before = tree(tmp_path)
    holder = hold(lock)
    try:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        line = error_line(err)
        assert f"{out} is in use by process {holder.pid} (" in line, line
        assert tree(tmp_path) == {
            **before,
            str(lock.relative_to(tmp_path)): lock.read_bytes(),
        }  # nothing else written
    finally:
        release(holder)
    assert not lock.exists()
    code, _, err = run_cli(capsys, *argv)  # once the holder is gone, the command works
    assert code == 0, err
    assert not lock.exists()


def test_a_killed_holder_releases_the_run_directory(tmp_path, data_dir, capsys):
    """A real run holds the lock: a second fresh run with other flags is refused, naming
    it. A kill -9 of the first leaves its lock file, which holds no one off: the kernel
    dropped the lock with the process."""
    run = tmp_path / "run"
    slow = (
        "import sys, time\nfrom bertforge.commands import pretrain\n"
        "from bertforge.cli.main import main\n"
        "real = pretrain.MLMTask.batch\npretrain.MLMTask.batch = "
        "lambda self, step: time.sleep(0.5) or real(self, step)\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    constant = ["--schedule", "constant", "--warmup-steps", "0"]  # its length may change
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow,
            *map(str, pretrain(data_dir, run, *constant, "--max-steps", "1000")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((run / "checkpoints").glob("step-*")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        code, _, err = run_cli(capsys, *pretrain(data_dir, run, "--lr", "1e-3"))
        assert code == 2
        assert f"run directory {run} is in use by process {first.pid} (" in error_line(err)
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert (run / ".lock").exists()  # left by the kill, naming the dead process
    code, _, err = run_cli(
        capsys, *pretrain(data_dir, run, *constant, "--max-steps", "1", "--resume")
    )
    assert code == 0, err
    assert "resuming from step-" in err and not (run / ".lock").exists()


# --------------------------------------------------- 20: tracebacks where one line is due


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"step": -1}, "step -1 is not the checkpoint's (step-000001)"),
        ({"step": 10**30}, "step 1000000000000000000000000000000 is not the checkpoint's"),
        ({"step": "1"}, "step '1' is not the checkpoint's"),
        ({"step": None}, "step None is not the checkpoint's"),
    ],
)
def test_a_sealed_state_with_a_bad_step_does_not_verify(run_copy, data_dir, capsys, edit, says):
    err = _resume_with_a_sealed_edit(run_copy, data_dir, capsys, edit)
    assert "no checkpoint in" in error_line(err) and "verifies" in error_line(err)
    assert says in err  # the warning that skipped it says why


def _resume_with_a_sealed_edit(run_copy: Path, data_dir: Path, capsys, edit: dict) -> str:
    """Edit step 1's state.json (None deletes a field), seal it again, resume: the stderr
    of a refusal that changed nothing."""
    step_dir = run_copy / "checkpoints" / "step-000001"
    state = json.loads((step_dir / "state.json").read_text())
    reseal(step_dir, {k: v for k, v in {**state, **edit}.items() if v is not None})
    before = tree(run_copy)
    code, _, err = run_cli(capsys, *pretrain(data_dir, run_copy, "--max-steps", "1", "--resume"))
    assert code == 2 and tree(run_copy) == before
    return err


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"rng": {"torch": "bm90IGFuIFJORw=="}}, "rng is not a random generator state torch can"),
        ({"rng": {"torch": 5}}, "rng is not a random generator state torch can"),
        ({"rng": "garbage"}, "rng is missing or not a random generator state"),
        ({"rng": None}, "rng is missing or not a random generator state"),
        ({"tokens": -5}, "tokens -5 is not a count"),
        ({"skipped_steps": "none"}, "skipped_steps 'none' is not a count"),
        ({"elapsed_s": "soon"}, "elapsed_s 'soon' is not a time in seconds"),
    ],
)
def test_a_sealed_state_that_cannot_be_restored_is_one_line(run_copy, data_dir, capsys, edit, says):
    err = _resume_with_a_sealed_edit(run_copy, data_dir, capsys, edit)
    assert f"step-000001/state.json: {says}" in error_line(err)


def run_commands(
    run: Path, data_dir: Path, task: list[object], out: Path
) -> dict[str, list[object]]:
    """The commands that load a run's checkpoint into a model of its config."""
    return {
        "resume": ["pretrain", "--out", run, "--resume", "--quiet"],
        "evaluate": ["evaluate", run],
        "export": ["export", run, "--out", out],
        "fill-mask": ["fill-mask", run, "the [MASK] sees the dog"],
        "finetune": ["finetune", run, *task, "--out", out],
    }


@pytest.mark.parametrize("command", ["resume", "evaluate", "export", "fill-mask", "finetune"])
def test_sealed_weights_of_the_wrong_shape_are_one_line(
    tmp_path, run_copy, data_dir, classification_files, capsys, command
):
    step_dir = run_copy / "checkpoints" / "step-000001"
    weights = ckpt.load_weights(step_dir)
    name = "bert.embeddings.position_embeddings.weight"
    weights[name] = weights[name][:32].clone()  # (64, 128) -> (32, 128)
    save_file(weights, str(step_dir / "model.safetensors"))
    reseal(step_dir)
    before = tree(run_copy)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, *run_commands(run_copy, data_dir, classification_files, out)[command]
    )
    assert code == 2
    assert (
        f"checkpoint does not match the model: {name} has shape (32, 128), the model's "
        f"config says (64, 128)"
    ) in error_line(err)
    assert tree(run_copy) == before and not out.exists()


@pytest.mark.parametrize("command", ["resume", "evaluate", "export"])
def test_config_yaml_edited_to_another_width_is_one_line(
    tmp_path, run_copy, data_dir, classification_files, capsys, command
):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 128", "hidden_size: 64"))
    before = tree(run_copy)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, *run_commands(run_copy, data_dir, classification_files, out)[command]
    )
    assert code == 2
    line = error_line(err)
    assert "checkpoint does not match the model: bert." in line
    assert "has shape (128" in line and "the model's config says (64" in line
    assert tree(run_copy) == before and not out.exists()


class Planted:
    """Unpickling this runs `os.system`: what a planted file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_planted_pytorch_model_bin_is_refused_naming_the_global(tmp_path, hf_dir, capsys):
    model = hf_copy(tmp_path, hf_dir)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save(
        {"bert.embeddings.word_embeddings.weight": torch.zeros(1), "x": Planted(f"touch {marker}")},
        model / "pytorch_model.bin",
    )
    code, _, err = run_cli(capsys, "fill-mask", model, "the [MASK] sees the dog")
    assert code == 2
    line = error_line(err)
    assert f"{model / 'pytorch_model.bin'}: refused to load" in line
    assert "posix.system" in line  # the refused global, by name
    assert "weights_only" not in line and "succeed" not in line  # no advice to run it
    assert not marker.exists()


def test_a_planted_optimizer_state_is_refused_naming_the_global(
    run_copy, data_dir, capsys, tmp_path
):
    step_dir = run_copy / "checkpoints" / "step-000001"
    marker = tmp_path / "pwned"
    torch.save(
        {"state": {}, "param_groups": [], "x": Planted(f"touch {marker}")},
        step_dir / "optimizer.pt",
    )
    reseal(step_dir)
    code, _, err = run_cli(capsys, *pretrain(data_dir, run_copy, "--max-steps", "1", "--resume"))
    assert code == 2
    line = error_line(err)
    assert (
        "step-000001/optimizer.pt: refused to load, it is not plain tensor data (it asks "
        "for the global posix.system)" in line
    )
    assert "weights_only" not in line and "succeed" not in line
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fill-mask", "finetune", "pretrain --init"])
def test_a_config_json_that_is_a_list_is_one_line(
    tmp_path, hf_dir, data_dir, classification_files, capsys, command
):
    model = hf_copy(tmp_path, hf_dir)
    (model / "config.json").write_text("[1, 2, 3]")
    argv = model_commands(model, tmp_path, data_dir, classification_files)[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "config.json" in error_line(err) and "JSON object" in error_line(err)


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "a/../../b"])
def test_a_shard_index_that_leaves_the_directory_is_refused(tmp_path, hf_dir, capsys, shard):
    model = hf_copy(tmp_path, hf_dir)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {"bert.embeddings.word_embeddings.weight": shard}}
        )
    )
    code, _, err = run_cli(capsys, "fill-mask", model, "the [MASK] sees the dog")
    assert code == 2
    assert f"refused shard {shard!r}" in error_line(err)


def test_top_k_past_the_vocabulary_gives_the_whole_vocabulary(
    tmp_path, one_step_run, tokenizer_dir, capsys
):
    """Clamped to the tokenizer's vocabulary, also for a model whose table has rows past
    it (those are no token)."""
    from bertforge.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(one_step_run / "tokenizer").get_vocab_size(with_added_tokens=True)
    wide = BertForPreTraining(preset("tiny", vocab_size=vocab + 40, max_position_embeddings=64))
    export_model(wide, tmp_path / "wide", tokenizer_dir=one_step_run / "tokenizer")
    for model in (one_step_run, tmp_path / "wide"):
        code, out, err = run_cli(
            capsys, "fill-mask", model, "the [MASK] sees the dog", "--top-k", "100000", "--json"
        )
        assert code == 0, err
        predictions = json.loads(out)[0]["predictions"]
        assert len(predictions) == vocab
        assert all(isinstance(p["token"], str) for p in predictions)


def test_an_out_that_is_not_utf8_is_refused_before_any_work(
    tmp_path, data_dir, one_step_run, capsys
):
    run = tmp_path / "run\udcff"  # the bytes b"run\xff", not valid UTF-8
    code, _, err = run_cli(capsys, *pretrain(data_dir, run))
    assert code == 2
    assert "--out '" in error_line(
        err
    ) and "run\\udcff': the name is not valid UTF-8" in error_line(err)
    code, _, err = run_cli(capsys, "export", one_step_run, "--out", tmp_path / "hf\udcff")
    assert code == 2 and "not valid UTF-8" in error_line(err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ 22: a signal during a long evaluation

SLOW_EVAL_CLI = """
import sys, time
from pathlib import Path
from bertforge.tasks import mlm
from bertforge.cli.main import main
mlm.EVAL_BATCH_SIZE = 1  # one held-out sequence a batch, each a second
real = mlm.cross_entropy_and_hits
def slow(*args):
    Path(sys.argv[1]).touch()
    time.sleep(1.0)
    return real(*args)
mlm.cross_entropy_and_hits = slow
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_evaluation_stops_at_once_and_saves_the_step(tmp_path, data_dir, capsys):
    run, evaluating = tmp_path / "run", tmp_path / "evaluating"
    argv = pretrain(
        data_dir,
        run,
        "--max-steps",
        "3",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "1",
        "--eval-sequences",
        "0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVAL_CLI, str(evaluating), *map(str, argv)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not evaluating.exists():  # the evaluation after step 1, about 20 s of it
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 5  # a batch or so, not the whole evaluation
    assert proc.returncode == 143, err
    assert "stopped by signal 15 at step 1; checkpoint saved" in err
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000001"]
    code, _, err = run_cli(capsys, *pretrain(data_dir, run, "--max-steps", "3", "--resume"))
    assert code == 0, err
    assert "resuming from step-000001" in err


def test_a_config_file_is_checked_with_the_preset_under_it(tmp_path, data_dir, capsys):
    """model: {hidden_size: ...} over --preset tiny (2 heads), not over the defaults' 12."""
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  hidden_size: 129\n")
    args = [
        "pretrain",
        "--data",
        data_dir,
        "--out",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--config",
        config,
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--quiet",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert error_line(err).endswith(
        "ModelConfig.hidden_size=129: (129) must be divisible by num_attention_heads (2)"
    )
    config.write_text("model:\n  hidden_size: 64\n")  # divisible by 2, not by 12
    code, _, err = run_cli(capsys, *args, "--max-position-embeddings", "64", "--seq-len", "32")
    assert code == 0, err
    config.write_text("model:\n  hidden_size: wide\n")  # keys and types: still the file's own
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "other")
    assert code == 2 and "c.yaml: model.hidden_size: expected int, got 'wide'" in error_line(err)


def test_an_unforeseen_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """The last resort: an OSError no check caught still ends in one line, exit 2."""
    from bertforge.cli import main as cli

    def fail(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "cmd_export", fail)
    code = cli.main(["export", str(tmp_path), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"bertforge: error: {tmp_path / 'x'}: No space left on device\n"
