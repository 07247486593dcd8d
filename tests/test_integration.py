"""The whole `pretrain --corpus` path on a slice of the real Wikipedia sample."""

from __future__ import annotations

import json

from bertforge.cli.main import main


def test_pretrain_corpus_on_wikipedia_slice(tmp_path, shared_corpus, capsys):
    files = sorted((shared_corpus / "text" / "AD").glob("wiki_0[0]"))
    assert files, "sample layout changed"
    run = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--corpus",
            *map(str, files),
            "--out",
            str(run),
            "--preset",
            "tiny",
            "--vocab-size",
            "3000",
            "--seq-len",
            "64",
            "--max-steps",
            "30",
            "--batch-size",
            "16",
            "--micro-batch-size",
            "16",
            "--lr",
            "1e-3",
            "--eval-every",
            "30",
            "--eval-sequences",
            "128",
            "--schedule",
            "constant",
            "--warmup-steps",
            "3",
            "--valid-fraction",
            "0.05",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["step"] == 30 and result["mlm_loss"] < 8.0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["splits"]["valid"]["documents"] >= 1
    assert manifest["splits"]["train"]["documents"] > 50
    assert (run / "hf" / "model.safetensors").is_file()
    # a second call reuses the tokenizer and shards already in RUN_DIR
    code = main(
        [
            "pretrain",
            "--corpus",
            *map(str, files),
            "--out",
            str(run),
            "--preset",
            "tiny",
            "--vocab-size",
            "3000",
            "--seq-len",
            "64",
            "--max-steps",
            "35",
            "--batch-size",
            "16",
            "--micro-batch-size",
            "16",
            "--lr",
            "1e-3",
            "--schedule",
            "constant",
            "--warmup-steps",
            "3",
            "--valid-fraction",
            "0.05",
            "--resume",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tokenizer: trained" not in err and "resuming from step-000030" in err
