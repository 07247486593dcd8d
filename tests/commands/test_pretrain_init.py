"""Continued pretraining: `pretrain --init MODEL` from Hugging Face BERT directories in each
form transformers writes, from a bertforge run; `--tokenizer`; BERT's two phases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from bertforge.config import RunConfig
from bertforge.data.tokenizer import tokenizer_hash, train_tokenizer
from bertforge.tasks.mlm import MLMTask

transformers = pytest.importorskip("transformers")

RUN = (
    "--seq-len 32 --batch-size 8 --micro-batch-size 8 --precision fp32 --dropout 0 "
    "--log-every 1 --eval-every 0 --eval-sequences 16 --lr 1e-3 --quiet"
).split()


@pytest.fixture(scope="module")
def cased_tokenizer(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("cased")
    train_tokenizer([str(corpus_file)], out, vocab_size=230, lowercase=False, show_progress=False)
    return out


def _vocab_size(tokenizer_dir: Path) -> int:
    return len((tokenizer_dir / "vocab.txt").read_text().splitlines())


def write_hf_model(
    folder: Path, tokenizer_dir: Path, kind: str, weights: str, tokenizer: str
) -> torch.nn.Module:
    """A tiny random transformers BERT saved as transformers saves it: `kind` is
    pretraining, masked_lm or bare; weights safetensors or bin; tokenizer json (written by
    transformers' tokenizer) or vocab (vocab.txt and tokenizer_config.json only)."""
    vocab = _vocab_size(tokenizer_dir)
    assert vocab % 64  # a vocabulary that is not a multiple of 64
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    cls = {
        "pretraining": transformers.BertForPreTraining,
        "masked_lm": transformers.BertForMaskedLM,
        "bare": transformers.BertModel,
    }[kind]
    torch.manual_seed(3)
    model = cls(config).eval()
    if weights == "safetensors":
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    lower = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["do_lower_case"]
    if tokenizer == "json":
        transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
        assert (folder / "tokenizer.json").is_file()
    else:
        shutil.copy(tokenizer_dir / "vocab.txt", folder / "vocab.txt")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    return model


def _train_lines(run: Path) -> list[dict]:
    return [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]


def _hf_loss_on_first_batch(run: Path, model: torch.nn.Module) -> float:
    """What the transformers model gives as MLM loss on the batch of step 1 of `run`."""
    cfg = RunConfig.load(run / "config.yaml")
    (micro,) = MLMTask(cfg, run / "data", torch.device("cpu")).batch(0).micro
    with torch.no_grad():
        out = model(input_ids=micro.input_ids)
        logits = getattr(out, "prediction_logits", None)
        logits = out.logits if logits is None else logits
    flat = logits.flatten(0, 1)[micro.masked_positions]
    return F.cross_entropy(flat, micro.targets).item()


@pytest.mark.parametrize(
    "kind, weights, tokenizer, cased",
    [
        ("pretraining", "safetensors", "json", False),
        ("masked_lm", "bin", "vocab", False),
        ("masked_lm", "safetensors", "json", True),
        ("pretraining", "bin", "vocab", True),
    ],
)
def test_continue_a_transformers_model(
    tmp_path, corpus_file, tokenizer_dir, cased_tokenizer, capsys, kind, weights, tokenizer, cased
):
    source = cased_tokenizer if cased else tokenizer_dir
    hf = tmp_path / "hf"
    model = write_hf_model(hf, source, kind, weights, tokenizer)
    run = tmp_path / "run"
    code, _out, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        hf,
        "--corpus",
        corpus_file,
        "--out",
        run,
        "--max-steps",
        "3",
        *RUN,
    )
    assert code == 0, err
    assert "tokenizer: trained" not in err  # the model's own tokenizer prepared the corpus
    saved = RunConfig.load(run / "config.yaml")
    assert saved.model.vocab_size == model.config.vocab_size and saved.model.hidden_size == 32
    assert saved.train.init == str(hf.resolve())
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tokenizer_hash(run / "tokenizer")
    ours = transformers.AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf))
    text = "The Happy cat sees the Dog ."
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]  # lowercasing as the model's
    if kind == "masked_lm":
        assert "it has none for the NSP head" in err
    # The weights went in: step 1's loss is the transformers model's on that batch.
    first = _train_lines(run)[0]["loss"]
    assert first == pytest.approx(_hf_loss_on_first_batch(run, model), abs=1e-4)
    # The export loads in transformers and gives bertforge's logits.
    exported = transformers.BertForMaskedLM.from_pretrained(str(run / "hf")).eval()
    from bertforge.commands.loading import load_run_model

    trained, _, _ = load_run_model(run)
    ids = torch.randint(5, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, trained(ids)[0], atol=1e-5, rtol=1e-5
        )


def test_continue_a_bare_bert_model(tmp_path, corpus_file, tokenizer_dir, capsys):
    hf = tmp_path / "hf"
    model = write_hf_model(hf, tokenizer_dir, "bare", "safetensors", "json")
    from bertforge.commands.loading import load_init_weights

    weights, missing = load_init_weights(hf)
    assert missing and all(k.startswith(("mlm.", "seq_relationship.")) for k in missing)
    torch.testing.assert_close(
        weights["bert.layers.1.ffn_out.weight"], model.encoder.layer[1].output.dense.weight
    )
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        hf,
        "--corpus",
        corpus_file,
        "--out",
        tmp_path / "run",
        "--max-steps",
        "3",
        *RUN,
    )
    assert code == 0, err
    assert "it has none for the MLM head and the NSP head, initialised fresh" in err


def test_a_continued_bertforge_run_starts_where_it_ended(tmp_path, data_dir, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    args = [
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
        *RUN,
    ]
    assert (
        run_cli(capsys, "pretrain", "--data", data_dir, "--out", first, "--max-steps", "40", *args)[
            0
        ]
        == 0
    )
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        first,
        "--data",
        data_dir,
        "--out",
        second,
        "--max-steps",
        "3",
        *RUN,
    )
    assert code == 0, err
    a, b = _train_lines(first), _train_lines(second)
    assert b[0]["step"] == 1  # the schedule starts afresh
    assert b[0]["loss"] < a[0]["loss"] - 1.0  # not a random model's loss
    assert abs(b[0]["loss"] - a[-1]["loss"]) < 0.5  # but the run's own
    # A checkpoint directory works as MODEL too.
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        first / "checkpoints" / "step-000040",
        "--data",
        data_dir,
        "--out",
        tmp_path / "c",
        "--max-steps",
        "1",
        *RUN,
    )
    assert code == 0, err
    assert _train_lines(tmp_path / "c")[0]["loss"] == b[0]["loss"]


def test_flags_that_contradict_the_model_are_refused(tmp_path, corpus_file, tokenizer_dir, capsys):
    hf = tmp_path / "hf"
    write_hf_model(hf, tokenizer_dir, "pretraining", "safetensors", "json")
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        hf,
        "--corpus",
        corpus_file,
        "--out",
        run,
        "--max-steps",
        "2",
        "--hidden-size",
        "64",
        *RUN,
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"bertforge: error: --init: model.hidden_size is 32 in {hf}, but the flags or "
        f"--config say 64; a continued run keeps its model's architecture"
    )
    assert not run.exists()
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        hf,
        "--corpus",
        corpus_file,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        run,
        "--max-steps",
        "2",
        *RUN,
    )
    assert code == 2 and "not both" in err and not run.exists()


def test_data_made_with_another_tokenizer_is_refused(tmp_path, data_dir, cased_tokenizer, capsys):
    hf = tmp_path / "hf"
    write_hf_model(hf, cased_tokenizer, "pretraining", "safetensors", "json")
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        hf,
        "--data",
        data_dir,
        "--out",
        tmp_path / "run",
        "--max-steps",
        "2",
        *RUN,
    )
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "data.tokenizer_hash" in line and f"--tokenizer {hf.resolve()}" in line


def test_a_given_tokenizer_makes_corpus_runs_reproducible(
    tmp_path, corpus_file, tokenizer_dir, capsys
):
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        code, _, err = run_cli(
            capsys,
            "pretrain",
            "--corpus",
            corpus_file,
            "--tokenizer",
            tokenizer_dir,
            "--out",
            run,
            "--preset",
            "tiny",
            "--max-position-embeddings",
            "64",
            "--max-steps",
            "4",
            *RUN,
        )
        assert code == 0, err
        assert "tokenizer: trained" not in err
    assert [r["loss"] for r in _train_lines(runs[0])] == [r["loss"] for r in _train_lines(runs[1])]
    assert tokenizer_hash(runs[0] / "tokenizer") == tokenizer_hash(tokenizer_dir)
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        runs[0] / "data",
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "x",
        "--max-steps",
        "1",
        *RUN,
    )
    assert code == 2 and "--tokenizer goes with --corpus" in err


def test_two_phases_128_then_512_in_miniature(tmp_path, corpus_file, data_dir, capsys):
    """BERT's recipe at tiny scale: phase 1 at 32 tokens, phase 2 continues it at 64 on data
    prepared at 64; a length past the position table is refused before any work."""
    from bertforge.data.prepare import prepare

    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    common = (
        "--precision fp32 --dropout 0 --log-every 1 --eval-every 0 --eval-sequences 8 "
        "--batch-size 8 --quiet"
    ).split()
    assert (
        run_cli(
            capsys,
            "pretrain",
            "--data",
            data_dir,
            "--out",
            phase1,
            "--preset",
            "tiny",
            "--max-position-embeddings",
            "64",
            "--seq-len",
            "32",
            "--max-steps",
            "30",
            "--lr",
            "2e-3",
            *common,
        )[0]
        == 0
    )
    long_data = tmp_path / "data-64"
    prepare(
        [str(corpus_file)],
        phase1 / "tokenizer",
        long_data,
        seq_len=64,
        valid_fraction=0.05,
        show_progress=False,
    )
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        phase1,
        "--data",
        long_data,
        "--out",
        phase2,
        "--seq-len",
        "64",
        "--max-steps",
        "3",
        "--lr",
        "5e-4",
        *common,
    )
    assert code == 0, err
    saved = RunConfig.load(phase2 / "config.yaml")
    assert saved.data.seq_len == 64 and saved.model.max_position_embeddings == 64
    assert _train_lines(phase2)[0]["loss"] < _train_lines(phase1)[0]["loss"] - 1.0
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--init",
        phase1,
        "--data",
        long_data,
        "--out",
        tmp_path / "too-long",
        "--seq-len",
        "128",
        "--max-steps",
        "1",
        *common,
    )
    assert code == 2 and "max_position_embeddings 64" in err
    assert not (tmp_path / "too-long").exists()
