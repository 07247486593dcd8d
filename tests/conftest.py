"""Shared fixtures: a small generated corpus, a tokenizer trained on it, prepared shards.

Everything is built in the test session from a few KB of text, so the suite needs no
downloads. Tests that want the real Wikipedia sample use `shared_corpus` and skip when
it is absent.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SHARED_CORPUS = (Path(__file__).resolve().parents[2] / "shared" / "data"
                 / "enwiki-2015-wikiextractor-sample")

NOUNS = "cat dog bird horse king queen river city garden teacher doctor ship".split()
ADJS = "small large red green old young quiet bright happy dark".split()
VERBS = "sees follows finds likes meets paints helps watches".split()


def make_document(rng: random.Random, sentences: int = 6) -> str:
    out = []
    for _ in range(sentences):
        out.append(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                   f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} near the {rng.choice(NOUNS)}.")
    return " ".join(out)


def write_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join(make_document(rng) for _ in range(documents)) + "\n")
    return path


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """Run `bertforge ARGV...` in-process: (exit status, stdout, stderr)."""
    from bertforge.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from bertforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus_file)], out, vocab_size=200, show_progress=False)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    from bertforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([str(corpus_file)], tokenizer_dir, out, seq_len=32, valid_fraction=0.05,
            show_progress=False)
    return out


@pytest.fixture
def shared_corpus() -> Path:
    if not SHARED_CORPUS.is_dir():
        pytest.skip(f"the shared Wikipedia sample is not present ({SHARED_CORPUS.name} "
                    "beside this repository); this test needs real text")
    return SHARED_CORPUS


def tiny_run_config(objective: str = "mlm", **train):
    """A RunConfig for tiny fp32 pretraining runs on `data_dir` (seq_len 32, no dropout);
    `train` overrides TrainConfig fields."""
    from bertforge.config import DataConfig, RunConfig, TrainConfig, preset

    model = preset("tiny", hidden_size=64, num_attention_heads=2, intermediate_size=128,
                   max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    values = dict(batch_size=16, micro_batch_size=16, lr=2e-3, warmup_fraction=0.1,
                  max_steps=40,
                  log_every=1, eval_every=20, eval_sequences=64, precision="fp32", seed=0)
    values.update(train)
    return RunConfig(model=model, data=DataConfig(seq_len=32, objective=objective),
                     train=TrainConfig(**values))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, on a machine without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
