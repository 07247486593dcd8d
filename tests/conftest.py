"""Shared fixtures and helpers: a small generated corpus, a tokenizer trained on it,
prepared shards, a one-step run and its export, a labelled task, the CLI run in-process.

Everything is built in the test session from a few KB of text, so the suite needs no
downloads. Tests that want the real Wikipedia sample use `shared_corpus` and skip when
it is absent. Helpers that scripts/ and benchmarks/ use too live in bertforge.testing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

# Re-exported for the tests: `from conftest import ...`.
from bertforge.testing import make_document, tiny_run_config, write_corpus  # noqa: F401

SHARED_CORPUS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki-2015-wikiextractor-sample"
)


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """Run `bertforge ARGV...` in-process: (exit status, stdout, stderr)."""
    from bertforge.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The only line on stderr, an error without a traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def error_line(err: str) -> str:
    """The one error line of a failed command (other stderr lines are progress notes)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if ": error:" in x]
    assert len(lines) == 1, err
    return lines[0]


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
    prepare(
        [str(corpus_file)], tokenizer_dir, out, seq_len=32, valid_fraction=0.05, show_progress=False
    )
    return out


@pytest.fixture
def shared_corpus() -> Path:
    if not SHARED_CORPUS.is_dir():
        pytest.skip(
            f"the shared Wikipedia sample is not present ({SHARED_CORPUS.name} "
            "beside this repository); this test needs real text"
        )
    return SHARED_CORPUS


@pytest.fixture(scope="module")
def one_thread():
    """One thread everywhere: light on a shared machine, and the same reduction order in
    this process and in subprocesses (which inherit OMP_NUM_THREADS). A module takes it
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


# -------------------------------------------------------- a tiny pretraining run and its export

TINY = "--preset tiny --max-position-embeddings 64 --seq-len 32 --batch-size 8 --quiet".split()


def tiny_pretrain_argv(data_dir: Path, run: Path, *extra: object) -> list[object]:
    """A tiny run's command line (2 steps, a checkpoint after each); later flags win."""
    return [
        "pretrain",
        "--data",
        data_dir,
        "--out",
        run,
        *TINY,
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        *extra,
    ]


@pytest.fixture(scope="session")
def one_step_run(tmp_path_factory, data_dir) -> Path:
    """A finished run with one checkpoint (step 1) and its export; tests that change it
    work on a copy."""
    from bertforge.cli.main import main

    run = tmp_path_factory.mktemp("one-step") / "run"
    argv = [str(a) for a in tiny_pretrain_argv(data_dir, run, "--max-steps", "1")]
    assert main(argv) == 0
    return run


@pytest.fixture(scope="session")
def hf_dir(one_step_run) -> Path:
    """The one-step run's Hugging Face export."""
    return one_step_run / "hf"


def reseal(step_dir: Path, state: dict | None = None) -> None:
    """Recompute the checksums (and the seal) of a checkpoint after tampering with it."""
    from bertforge.train import checkpoint as ckpt

    state = state if state is not None else json.loads((step_dir / "state.json").read_text())
    state = {k: v for k, v in state.items() if k != "state_sha256"}
    state["checksums"] = {
        f: hashlib.sha256((step_dir / f).read_bytes()).hexdigest() for f in state["checksums"]
    }
    ckpt.write_state(step_dir, state)


def tiny_model(tokenizer_dir: Path):
    """A random 2-layer, 32-wide BertForPreTraining (seed 0, eval mode) sized to the
    tokenizer in `tokenizer_dir`."""
    from bertforge.config import ModelConfig
    from bertforge.model.bert import BertForPreTraining

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    return BertForPreTraining(
        ModelConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        )
    ).eval()


# ------------------------------------------------------------------ fine-tuning data and runs


@pytest.fixture(scope="session")
def classification_files(tmp_path_factory) -> list[object]:
    """finetune's own-data flags for a tiny labelled task."""
    root = tmp_path_factory.mktemp("task")
    rows = "text,label\n" + "".join(
        f"the {w} sees the dog,{i % 2}\n" for i, w in enumerate(["cat", "king", "bird", "ship"] * 4)
    )
    (root / "train.csv").write_text(rows)
    (root / "valid.csv").write_text(rows)
    return [
        "--train",
        root / "train.csv",
        "--validation",
        root / "valid.csv",
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--max-steps",
        "1",
        "--max-length",
        "32",
        "--quiet",
    ]


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, one_step_run, classification_files) -> tuple[Path, list]:
    """A one-step fine-tuning run of the tiny model, and its command line; tests that
    change it work on a copy."""
    from bertforge.cli.main import main

    out = tmp_path_factory.mktemp("ft") / "ft"
    argv = ["finetune", str(one_step_run), *map(str, classification_files), "--out", str(out)]
    assert main(argv) == 0
    return out, argv


# Words of the generated corpus, so the tiny tokenizer knows them.
SST2_NOUNS = ["cat", "dog", "bird", "horse", "king", "queen", "river", "city", "garden", "teacher"]
POSITIVE, NEGATIVE = (
    ["happy", "bright", "young", "green", "large"],
    ["dark", "old", "quiet", "small", "red"],
)
SST2_VERBS = ["sees", "follows", "finds", "likes", "meets"]


def sentence(rng: random.Random) -> tuple[str, int]:
    """A sentence whose label is whether its two adjectives are 'positive' ones."""
    label = rng.random() < 0.5
    adj = POSITIVE if label else NEGATIVE
    return (
        f"the {rng.choice(adj)} {rng.choice(SST2_NOUNS)} {rng.choice(SST2_VERBS)} the "
        f"{rng.choice(adj)} {rng.choice(SST2_NOUNS)} ."
    ), int(label)


def write_sst2(folder: Path, train: int = 128, dev: int = 48, header: bool = True) -> Path:
    """A synthetic SST-2 folder (train.tsv, dev.tsv) in GLUE's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", train), ("dev", dev)):
        rows = "".join(f"{s}\t{y}\n" for s, y in (sentence(rng) for _ in range(n)))
        (folder / f"{split}.tsv").write_text(("sentence\tlabel\n" if header else "") + rows)
    return folder


def tiny_finetune(**kw):
    """A FinetuneConfig for tiny fp32 runs; `kw` overrides its fields and TrainConfig's."""
    from bertforge.config import TrainConfig
    from bertforge.finetune_config import FinetuneConfig

    # A tiny, barely pretrained model sits at chance for a while before it finds the
    # adjectives; these settings leave it a margin (seeds 1-4 learn the task by epoch 2).
    values = dict(
        lr=2e-3,
        epochs=3,
        batch_size=8,
        micro_batch_size=8,
        max_length=32,
        dropout=0.0,
        seed=1,
        precision="fp32",
        log_every=1,
        eval_batch_size=32,
    )
    values.update(kw)
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    return FinetuneConfig.from_dict(
        {
            **{k: v for k, v in values.items() if k not in train},
            "train": {k: v for k, v in values.items() if k in train},
        }
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "report: keeps the plots and report.md that "
        "pretraining writes at its end (other tests skip them)",
    )


@pytest.fixture(autouse=True)
def no_run_report(request, monkeypatch):
    """A pretraining run ends by drawing its report (four matplotlib figures, about a
    second); over the suite's many tiny runs that is a minute of plotting. Tests marked
    `report` (commands/test_report.py, where reports may go, what the commands print)
    keep it; the others skip it."""
    if request.node.get_closest_marker("report") is None:
        from bertforge.commands import pretrain

        monkeypatch.setattr(pretrain, "write_run_report", lambda run_dir: None)


def pytest_collection_modifyitems(config, items):
    """The `slow` tests run first: with several workers (`make test` runs two) the long
    ones then overlap each other and the short ones fill the gaps, instead of one worker
    finishing a long tail alone. Tests marked `cuda` skip, with the reason, on a machine
    without a CUDA GPU."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
