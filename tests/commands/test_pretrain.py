"""Pretraining end to end on a tiny model: loss falls, micro-batching, save/load, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, one_line_error, run_cli, tiny_run_config

from bertforge.commands.loading import load_run_model
from bertforge.commands.pretrain import run_pretrain
from bertforge.config import RunConfig


def tiny_config(**train) -> RunConfig:
    return tiny_run_config(**train)


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def test_loss_falls_and_run_dir_layout(tmp_path, data_dir):
    run = tmp_path / "run"
    result = run_pretrain(run, tiny_config(), data_dir=data_dir, show_progress=False)
    curve = losses(run)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0, curve
    assert result["step"] == 40 and "mlm_loss" in result
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "vocab.txt").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000040"
    ckpt = run / "checkpoints" / "step-000040"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.pt", "state.json"}
    assert (run / "hf" / "config.json").is_file()
    evals = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "eval"
    ]
    assert [e["step"] for e in evals] == [20, 40]


EAGER_AND_COMPILED = [False, pytest.param(True, marks=pytest.mark.slow, id="compiled")]


@pytest.mark.parametrize("compiled", EAGER_AND_COMPILED)
def test_losses_do_not_depend_on_micro_batch_size(tmp_path, data_dir, compiled):
    a, b = tmp_path / "a", tmp_path / "b"
    run_pretrain(
        a,
        tiny_config(max_steps=6, micro_batch_size=16, compile=compiled),
        data_dir=data_dir,
        show_progress=False,
    )
    run_pretrain(
        b,
        tiny_config(max_steps=6, micro_batch_size=4, compile=compiled),
        data_dir=data_dir,
        show_progress=False,
    )
    torch.testing.assert_close(torch.tensor(losses(a)), torch.tensor(losses(b)), atol=1e-5, rtol=0)


def test_checkpoint_and_export_hold_what_was_trained(tmp_path, data_dir):
    """The model in memory at the end of `fit`, its checkpoint and its export give the
    same logits."""
    from bertforge.hf import export_model, import_model
    from bertforge.tasks.mlm import MLMTask, pretraining_model
    from bertforge.train.loop import fit

    cfg = tiny_config(max_steps=3, eval_every=0)
    cfg.model.vocab_size = 200
    run = tmp_path / "run"
    torch.manual_seed(0)
    trained = pretraining_model(cfg.model, "mlm")
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    fit(trained, task, cfg.train, run, torch.device("cpu"), None, show_progress=False)
    cfg.save(run / "config.yaml")  # what run_pretrain would have written around fit
    loaded, _, _ = load_run_model(run)
    ids = torch.randint(5, cfg.model.vocab_size, (2, 32))
    trained.eval()
    with torch.no_grad():
        expected = trained(ids)[0]
        torch.testing.assert_close(loaded(ids)[0], expected, atol=0, rtol=0)
        exported, _ = import_model(export_model(loaded, tmp_path / "hf"))
        torch.testing.assert_close(exported.eval()(ids)[0], expected, atol=1e-6, rtol=0)
    untrained = pretraining_model(cfg.model, "mlm").eval()
    with torch.no_grad():
        assert not torch.allclose(untrained(ids)[0], expected)  # the test can fail


def test_tokens_count_real_tokens_not_padding(tmp_path, corpus_file, tokenizer_dir):
    """With document_boundary 'new' each document's last sequence is padded; `tokens`
    counts the real ones (the same meaning as in fine-tuning)."""
    from bertforge.data.loader import PretrainBatches, ShardedSequences
    from bertforge.data.prepare import prepare

    data = tmp_path / "data"
    prepare(
        [str(corpus_file)],
        tokenizer_dir,
        data,
        seq_len=32,
        valid_fraction=0.05,
        show_progress=False,
        document_boundary="new",
    )
    cfg = tiny_config(max_steps=4, eval_every=0)
    cfg.data.document_boundary = "new"
    run_pretrain(tmp_path / "run", cfg, data_dir=data, show_progress=False)
    train = ShardedSequences(data, "train")
    batches = PretrainBatches(train, None, 16, 16, seed=0)
    real = sum(int((train.take(batches.global_indices(s)[0]) != 0).sum()) for s in range(4))
    last = [
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ][-1]
    assert last["tokens"] == real < 4 * 16 * 32


@pytest.mark.parametrize("compiled", EAGER_AND_COMPILED)
def test_resume_is_exact(tmp_path, data_dir, compiled):
    """Train 8 steps; separately, resume the same run from its step-4 checkpoint to 8.
    Compiled, dropout's masks come from Inductor's generator, seeded from torch's: the
    state a checkpoint restores."""
    full, half = tmp_path / "full", tmp_path / "half"
    cfg = _with_dropout(
        tiny_config(
            max_steps=8, micro_batch_size=8, checkpoint_every=4, eval_every=0, compile=compiled
        )
    )
    run_pretrain(full, cfg, data_dir=data_dir, show_progress=False)
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints" / "step-000008")  # as if killed after step 4's save
    run_pretrain(half, cfg, data_dir=data_dir, resume=True, show_progress=False)
    assert len(losses(full)) == 8
    assert losses(full) == losses(half)
    a, _, _ = load_run_model(full)
    b, _, _ = load_run_model(half)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _with_dropout(cfg: RunConfig) -> RunConfig:
    cfg.model.hidden_dropout_prob = 0.1
    cfg.model.attention_probs_dropout_prob = 0.1
    return cfg


def test_bf16_tracks_fp32(tmp_path, data_dir):
    from bertforge.train.runtime import resolve_precision

    if resolve_precision("auto", torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bf16")
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    run_pretrain(a, tiny_config(max_steps=20), data_dir=data_dir, show_progress=False)
    run_pretrain(
        b, tiny_config(max_steps=20, precision="bf16"), data_dir=data_dir, show_progress=False
    )
    la, lb = losses(a), losses(b)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 0.1, (la, lb)


@pytest.mark.slow
def test_compiled_run_matches_eager_and_saves_plain_keys(tmp_path, data_dir):
    from safetensors import safe_open

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_pretrain(
        eager, tiny_config(max_steps=3, eval_every=0), data_dir=data_dir, show_progress=False
    )
    run_pretrain(
        compiled,
        tiny_config(max_steps=3, eval_every=0, compile=True),
        data_dir=data_dir,
        show_progress=False,
    )
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    with safe_open(compiled / "checkpoints" / "step-000003" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "_orig_mod" in k]
    assert load_run_model(compiled)[0] is not None


# ------------------------------------------------------ config.yaml records what was run


@pytest.fixture(scope="module")
def data_02(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    from bertforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("data02") / "data"
    prepare(
        [str(corpus_file)], tokenizer_dir, out, seq_len=32, valid_fraction=0.2, show_progress=False
    )
    return out


def tiny_pretrain(capsys, data: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        capsys, "pretrain", "--data", data, "--out", run, *TINY, "--max-steps", "3", *extra
    )


def test_config_records_the_valid_fraction_the_data_was_prepared_with(capsys, tmp_path, data_02):
    code, _, err = tiny_pretrain(capsys, data_02, tmp_path / "run")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["valid_fraction"] == 0.2


def test_a_typed_valid_fraction_the_data_contradicts_is_refused(capsys, tmp_path, data_02):
    code, _, err = tiny_pretrain(capsys, data_02, tmp_path / "run", "--valid-fraction", "0.05")
    assert code == 2
    assert "prepared with valid_fraction 0.2" in one_line_error(err)
    assert not (tmp_path / "run").exists()
