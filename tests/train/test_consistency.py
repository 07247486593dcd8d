"""What is loaded is checked against what it is used with (bertforge.train.consistency), across
every command that loads it: optimizer and run state on --resume (pretrain, finetune),
a tokenizer against its model's config (every command that loads a model), the memory a
training run needs (pretrain, finetune), a cache record against what it describes.

Tampered files are "resealed" (their checksums recomputed), so only the content checks
stand in the way. Each refusal is one line, exit 2, never a traceback or a crash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, error_line, reseal, run_cli, write_corpus
from conftest import tiny_pretrain_argv as pretrain

from bertforge.config import preset
from bertforge.errors import BertforgeError
from bertforge.train import consistency

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resume_commands(
    tmp_path: Path, one_step_run: Path, finetuned: tuple[Path, list], data_dir: Path
) -> dict[str, tuple[Path, list]]:
    """Each command that resumes, on a copy of a run it can resume: (checkpoint, argv)."""
    run = _copy(one_step_run, tmp_path / "run")
    ft, argv = finetuned
    ft_copy = _copy(ft, tmp_path / "ft")
    ft_argv = [a if a != str(ft) else str(ft_copy) for a in argv] + ["--resume"]
    return {
        "pretrain": (
            run / "checkpoints" / "step-000001",
            pretrain(data_dir, run, "--max-steps", "1", "--resume"),
        ),
        "finetune": (ft_copy / "checkpoints" / "step-000001", ft_argv),
    }


def _wrong_shape(s: dict) -> dict:
    first = next(iter(s["state"]))
    s["state"][first]["exp_avg"] = torch.zeros(3)
    return s


def _wrong_dtype(s: dict) -> dict:
    first = next(iter(s["state"]))
    s["state"][first]["exp_avg_sq"] = s["state"][first]["exp_avg_sq"].double()
    return s


def _five_fewer(s: dict) -> dict:
    gone = s["param_groups"][0]["params"][:5]
    s["param_groups"][0]["params"] = s["param_groups"][0]["params"][5:]
    for i in gone:
        s["state"].pop(i, None)
    return s


def _betas(s: dict) -> dict:
    s["param_groups"][0]["betas"] = (0.5, 0.5)
    return s


OPTIMIZER_CASES = {
    "a list": (lambda s: [1, 2, 3], "not an optimizer state"),
    "no param_groups": (lambda s: {"state": s["state"]}, "not an optimizer state"),
    "wrong moment shape": (_wrong_shape, ".exp_avg has shape (3,)"),
    "wrong moment dtype": (_wrong_dtype, "torch.float64"),
    "five parameters fewer": (_five_fewer, "parameters, the model's"),
    "other betas": (_betas, "param_groups[0].betas is [0.5, 0.5]"),
    "a state of no parameter": (
        lambda s: {**s, "state": {**s["state"], 10**6: {}}},
        "belongs to no parameter",
    ),
}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_a_resealed_optimizer_state_that_does_not_fit_is_refused(
    tmp_path, capsys, one_step_run, finetuned, data_dir, command, case
):
    step, argv = _resume_commands(tmp_path, one_step_run, finetuned, data_dir)[command]
    tamper, match = OPTIMIZER_CASES[case]
    state = torch.load(step / "optimizer.pt", weights_only=True)
    torch.save(tamper(state), step / "optimizer.pt")
    reseal(step)
    code, _, err = run_cli(capsys, *argv)
    line = error_line(err)
    assert code == 2
    assert "step-000001/optimizer.pt: " in line and match in line, line


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_state_past_the_runs_end_is_refused(
    tmp_path, capsys, one_step_run, finetuned, data_dir, command
):
    step, argv = _resume_commands(tmp_path, one_step_run, finetuned, data_dir)[command]
    later = step.parent / "step-000050"  # a state at step 50 of a run of a few steps
    step.rename(later)
    (step.parent / "latest").write_text("step-000050\n")
    state = json.loads((later / "state.json").read_text())
    reseal(later, {**state, "step": 50})
    code, _, err = run_cli(capsys, *argv)
    line = error_line(err)
    assert code == 2
    assert "step-000050/state.json: step 50 is past the run's max_steps" in line


def test_an_edited_build_record_does_not_pass_off_another_corpus(tmp_path, capsys):
    """built_from.json says corpus B; the cached data was made from corpus A: rebuilt from
    B while the run has no checkpoint, refused once it has one."""
    a = write_corpus(tmp_path / "a.txt", documents=60, seed=1)
    b = write_corpus(tmp_path / "b.txt", documents=60, seed=2)
    run = tmp_path / "run"
    argv = [
        "pretrain",
        "--corpus",
        "{corpus}",
        "--out",
        str(run),
        *TINY,
        "--vocab-size",
        "200",
        "--max-steps",
        "1",
    ]
    assert run_cli(capsys, *[x.format(corpus=a) for x in argv])[0] == 0

    def forge() -> None:  # the record made to describe B
        record = json.loads((run / "built_from.json").read_text())
        st = os.stat(b)
        record["corpus"] = [[os.path.abspath(b), st.st_size, st.st_mtime_ns]]
        (run / "built_from.json").write_text(json.dumps(record))

    forge()
    code, _, err = run_cli(capsys, *[x.format(corpus=b) for x in argv], "--resume")
    assert code == 2
    assert "manifest.json names other corpus files than built_from.json records" in error_line(err)
    shutil.rmtree(run / "checkpoints")
    (run / "config.yaml").unlink()
    forge()
    assert run_cli(capsys, *[x.format(corpus=b) for x in argv])[0] == 0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["corpus_files"] == [str(b)]


# ------------------------------------------------- a model directory is consistent (4)


def _oversize_tokenizer(directory: Path, vocab_size: int) -> None:
    """A vocab.txt-only tokenizer with more tokens than the model, [MASK] past its end."""
    for name in ("tokenizer.json", "vocab.txt"):
        (directory / name).unlink(missing_ok=True)
    words = [f"w{i}" for i in range(vocab_size + 5)]
    (directory / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, "[MASK]"]) + "\n"
    )


def _model_commands(
    tmp_path: Path, one_step_run: Path, hf: Path, finetuned: Path, data_dir: Path, task: list
) -> dict[str, tuple[Path, list]]:
    """Every command that loads a model, on a copy of a model it can load: (the directory
    whose tokenizer is replaced, argv)."""
    run = _copy(one_step_run, tmp_path / "run")
    model = _copy(hf, tmp_path / "hf")
    clf = _copy(finetuned / "hf", tmp_path / "clf")
    (tmp_path / "in.txt").write_text("the cat\n")
    return {
        "fill-mask hf": (model, ["fill-mask", model, "the [MASK] sees the dog"]),
        "fill-mask run": (run / "tokenizer", ["fill-mask", run, "the [MASK] sees the dog"]),
        "finetune hf": (model, ["finetune", model, *task, "--out", tmp_path / "o"]),
        "finetune run": (run / "tokenizer", ["finetune", run, *task, "--out", tmp_path / "o"]),
        "finetune --from-scratch": (
            model,
            ["finetune", model, *task, "--from-scratch", "--out", tmp_path / "o"],
        ),
        "predict": (clf, ["predict", clf, "--input", tmp_path / "in.txt"]),
        "evaluate": (run / "tokenizer", ["evaluate", run]),
        "export": (run / "tokenizer", ["export", run, "--out", tmp_path / "export"]),
        "pretrain --init hf": (
            model,
            [
                "pretrain",
                "--init",
                model,
                "--data",
                data_dir,
                "--out",
                tmp_path / "i",
                "--max-steps",
                "1",
                "--quiet",
            ],
        ),
        "pretrain --init run": (
            run / "tokenizer",
            [
                "pretrain",
                "--init",
                run,
                "--data",
                data_dir,
                "--out",
                tmp_path / "i",
                "--max-steps",
                "1",
                "--quiet",
            ],
        ),
    }


MODEL_COMMANDS = [
    "fill-mask hf",
    "fill-mask run",
    "finetune hf",
    "finetune run",
    "finetune --from-scratch",
    "predict",
    "evaluate",
    "export",
    "pretrain --init hf",
    "pretrain --init run",
]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_tokenizer_past_the_models_vocabulary_is_refused(
    tmp_path, capsys, one_step_run, hf_dir, finetuned, data_dir, classification_files, command
):
    where, argv = _model_commands(
        tmp_path, one_step_run, hf_dir, finetuned[0], data_dir, classification_files
    )[command]
    _oversize_tokenizer(where, _vocab_size(one_step_run))
    code, _, err = run_cli(capsys, *argv)
    line = error_line(err)
    assert code == 2
    assert "the tokenizer's [MASK] has id" in line and "past the model's vocab_size" in line


def _vocab_size(run: Path) -> int:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"]


def test_fill_mask_with_only_a_vocab_txt(tmp_path, capsys, hf_dir):
    """vocab.txt is a documented tokenizer: its [MASK] is the mask token, not 3 pieces."""
    from bertforge.data.tokenizer import load_tokenizer

    model = _copy(hf_dir, tmp_path / "hf")
    vocab = load_tokenizer(model).get_vocab()
    (model / "tokenizer.json").unlink()
    (model / "vocab.txt").write_text(
        "".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda x: x[1]))
    )
    code, out, err = run_cli(capsys, "fill-mask", model, "the [MASK] sees the dog", "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 1


def test_training_that_cannot_fit_in_memory_is_refused(monkeypatch):
    """A 10-million-entry tokenizer makes `tiny` 1.29 billion parameters: 5 GB of fp32
    weights, but 20 GB and more to train."""
    config = preset("tiny", vocab_size=10_000_000)
    assert config.num_parameters > 1.28e9
    monkeypatch.setattr(consistency, "available_memory", lambda: 8 * 10**9)
    with pytest.raises(
        BertforgeError, match=r"needs at least 20.7 GB .* this machine has 8.0 GB available"
    ):
        consistency.check_training_fits(config, 32, 128, torch.device("cpu"))
    consistency.check_training_fits(preset("tiny", vocab_size=1000), 32, 128, torch.device("cpu"))


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_every_training_command_checks_its_memory(
    tmp_path, capsys, monkeypatch, data_dir, one_step_run, classification_files, command
):
    monkeypatch.setattr(consistency, "available_memory", lambda: 10**6)  # 1 MB
    argv = {
        "pretrain": pretrain(data_dir, tmp_path / "run", "--device", "cpu"),
        "finetune": [
            "finetune",
            one_step_run,
            *classification_files,
            "--out",
            tmp_path / "ft",
            "--device",
            "cpu",
        ],
    }[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "this machine has 0.0 GB available" in error_line(err)
