"""The Python API: docs/python-api.md runs as written; the functions check their options as
the commands do (the same messages) and return values; `import bertforge` needs no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, tiny_run_config

import bertforge
from bertforge import BertforgeError, api

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


@pytest.mark.slow  # about half a minute: two tiny pretraining runs and a fine-tuning
def test_the_python_api_page_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_md"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name}, python block {number}", "exec"), namespace)
    assert namespace["run"].step == 40
    assert 0 <= namespace["tuned"].score <= 1


def test_import_bertforge_imports_no_torch():
    code = (
        "import sys, bertforge; assert 'torch' not in sys.modules; bertforge.pretrain; "
        "bertforge.RunConfig; import bertforge.cli.main; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_exports_are_there():
    for name in bertforge.__all__:
        assert getattr(bertforge, name) is not None
    assert set(bertforge.__all__) <= set(dir(bertforge))
    with pytest.raises(AttributeError):
        bertforge.no_such_function  # noqa: B018


@pytest.mark.parametrize(
    "argv, call",
    [
        (["pretrain", "--out", "{tmp}/r"], lambda t, d: bertforge.pretrain(f"{t}/r")),
        (
            (
                "pretrain --data {data} --out {tmp}/r --tokenizer {data}/tokenizer --max-steps 1"
            ).split(),
            lambda t, d: bertforge.pretrain(
                f"{t}/r", data=d, tokenizer=f"{d}/tokenizer", max_steps=1
            ),
        ),
        (
            ["pretrain", "--data", "{data}", "--out", "{tmp}/r", "--preset", "huge"],
            lambda t, d: bertforge.pretrain(f"{t}/r", data=d, preset="huge"),
        ),
        (
            ["pretrain", "--data", "{data}", "--out", "{data}/r"],
            lambda t, d: bertforge.pretrain(f"{d}/r", data=d),
        ),
        (
            (
                "pretrain --data {data} --out {tmp}/r --hidden-size 100 --num-attention-heads 3"
            ).split(),
            lambda t, d: bertforge.pretrain(
                f"{t}/r", data=d, hidden_size=100, num_attention_heads=3
            ),
        ),
        (["evaluate", "{tmp}/nope"], lambda t, d: bertforge.evaluate(f"{t}/nope")),
        (
            ["export", "{tmp}/nope", "--out", "{tmp}/hf"],
            lambda t, d: bertforge.export(f"{t}/nope", f"{t}/hf"),
        ),
        (
            ["fill-mask", "{tmp}/nope", "a [MASK] b"],
            lambda t, d: bertforge.fill_mask(f"{t}/nope", "a [MASK] b"),
        ),
        (
            ["finetune", "{tmp}/nope", "--out", "{tmp}/ft", "--train", "{tmp}/a.csv"],
            lambda t, d: bertforge.finetune(f"{t}/nope", f"{t}/ft", train=f"{t}/a.csv"),
        ),
        (
            ["predict", "{tmp}/nope", "--input", "{tmp}/a.csv"],
            lambda t, d: list(bertforge.predict_file(f"{t}/nope", f"{t}/a.csv")),
        ),
    ],
)
def test_the_api_refuses_what_the_cli_refuses_with_its_message(
    capsys, tmp_path, data_dir, argv, call
):
    code, _, err = run_cli(capsys, *(a.format(tmp=tmp_path, data=data_dir) for a in argv))
    assert code == 2
    with pytest.raises(BertforgeError) as e:
        call(tmp_path, data_dir)
    assert err.strip() == f"bertforge: error: {e.value}"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: bertforge.pretrain("r", data=d, lr=-1), r"TrainConfig.lr=-1.0: must be > 0"),
        (lambda d: bertforge.pretrain("r", data=d, lr="fast"), r"train.lr: expected float"),
        (lambda d: bertforge.pretrain("r", data=d, learning_rate=1e-3), "unknown option"),
        (
            lambda d: bertforge.pretrain("r", data=d, preset="tiny", config=bertforge.RunConfig()),
            "not both",
        ),
        (
            lambda d: bertforge.finetune("m", "o", epochs=0),
            r"FinetuneConfig.epochs=0: must be >= 1",
        ),
        (lambda d: bertforge.finetune("m", "o", init="x"), "unknown option 'init'"),
        (lambda d: bertforge.fill_mask(d, "a [MASK]", top_k=0), r"top_k=0: must be >= 1"),
        (lambda d: bertforge.evaluate(d, max_sequences=-1), r"max_sequences=-1: must be >= 0"),
        (lambda d: bertforge.evaluate(d, precision="fp16"), "precision='fp16': must be one of"),
        (lambda d: bertforge.prepare("c.txt", d, "o", seq_len=4), r"seq_len=4: must be >= 8"),
        (lambda d: bertforge.prepare("c.txt", d, "o", document_boundary="x"), "must be one of"),
        (lambda d: bertforge.train_tokenizer("c.txt", "o", min_frequency=0), "must be >= 1"),
        (lambda d: bertforge.predict(d, ["a"], batch_size=0), r"batch_size=0: must be >= 1"),
    ],
)
def test_options_are_checked_before_any_work(data_dir, tmp_path, monkeypatch, call, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BertforgeError, match=match):
        call(data_dir)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_options_layer_as_the_flags_do(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  warmup_fraction: 0.3\n  lr: 0.001\n")
    cfg, given = api.resolve_run_config("tiny", yaml_file, {"warmup_steps": 9, "seq_len": 64})
    assert (cfg.model.hidden_size, cfg.train.lr, cfg.data.seq_len) == (128, 1e-3, 64)
    assert (cfg.train.warmup_steps, cfg.train.warmup_fraction) == (9, None)  # the later form
    assert given["model"]["hidden_size"] == 128 and given["train"]["lr"] == 1e-3
    assert "warmup_fraction" not in given["train"]
    cfg, given = api.resolve_run_config(None, None, {}, dropout=0.0)
    assert cfg.model.hidden_size == 256  # mini, the default preset; not given
    assert given["model"] == {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    # A RunConfig: what differs from the defaults is what the caller chose.
    cfg, given = api.resolve_run_config(None, tiny_run_config(), {"lr": 5e-3})
    assert cfg.train.lr == 5e-3 and cfg.model.hidden_size == 64
    assert given["train"]["lr"] == 5e-3 and given["model"]["hidden_size"] == 64
    assert "adam_beta1" not in given["train"]


def test_finetune_options_layer_over_a_config():
    cfg, given = api.resolve_finetune_config(None, {"epochs": 2, "lr": 1e-4})
    assert (cfg.epochs, cfg.train.lr, cfg.train.batch_size) == (2, 1e-4, 32)  # BERT's default
    assert given == {"epochs": 2, "lr": 1e-4}
    base = bertforge.FinetuneConfig(max_length=64)
    cfg, given = api.resolve_finetune_config(base, {"warmup_steps": 3})
    assert (cfg.max_length, cfg.train.warmup_steps, cfg.train.warmup_fraction) == (64, 3, None)
    assert given == {"max_length": 64, "warmup_steps": 3}


def test_pretrain_evaluate_fill_mask_export_return_values(capsys, tmp_path, data_dir):
    cfg = tiny_run_config(max_steps=4, eval_every=0)
    run = bertforge.pretrain(tmp_path / "run", data=data_dir, config=cfg, quiet=True)
    assert isinstance(run, bertforge.PretrainResult)
    assert run.step == 4 and run.tokens > 0 and run.train_time_s > 0
    assert {"mlm_loss", "mlm_accuracy", "perplexity"} <= set(run.metrics)
    assert run.config.model.hidden_size == 64 and Path(run.config.data.path) == data_dir.resolve()
    assert (run.hf_dir / "config.json").is_file()
    # The command's answers are the function's values.
    metrics = bertforge.evaluate(run.run_dir, out=tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics
    code, out, _ = run_cli(capsys, "evaluate", run.run_dir)
    assert code == 0 and json.loads(out) == metrics
    fills = bertforge.fill_mask(run.hf_dir, "the [MASK] sees the [MASK].", top_k=2)
    assert [(f.index, f.position) for f in fills] == [(0, 2), (1, 5)]
    assert all(
        len(f.predictions) == 2
        and isinstance(f.predictions[0][0], str)
        and 0 <= f.predictions[0][1] <= 1
        for f in fills
    )
    code, out, _ = run_cli(
        capsys, "fill-mask", run.hf_dir, "the [MASK] sees the [MASK].", "--json", "--top-k", "2"
    )
    assert [[(p["token"], p["score"]) for p in r["predictions"]] for r in json.loads(out)] == [
        f.predictions for f in fills
    ]
    assert bertforge.export(run.run_dir, tmp_path / "hf") == tmp_path / "hf"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
