"""What the commands write to a log file (stderr not a terminal): no blank lines or
carriage returns from progress bars, nothing said twice, counts in the right number, and
warnings where a document-level held-out split cannot hold out what was asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, write_corpus

from bertforge.data.prepare import split_warnings
from bertforge.data.readers import CorpusStats

pytestmark = pytest.mark.report  # what the commands print includes the report's line


def test_tokenizer_and_prepare_write_plain_lines_off_a_terminal(tmp_path, capfd):
    corpus = write_corpus(tmp_path / "c.txt", documents=40)
    code, _, err = run_cli(
        capfd, "tokenizer", corpus, "--out", tmp_path / "tok", "--vocab-size", "200"
    )
    assert code == 0, err
    assert "\r" not in err and all(line.strip() for line in err.splitlines()), repr(err)
    assert "corpus: 1 file (1 text)" in err
    code, _out, err = run_cli(
        capfd,
        "prepare",
        corpus,
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "data",
        "--workers",
        "1",
    )
    assert code == 0, err
    assert "\r" not in err and all(line.strip() for line in err.splitlines()), repr(err)
    assert f"-> {tmp_path / 'data'}" in err and "1 file (" in err


def test_pretrain_from_a_corpus_prints_each_stage_once(tmp_path, capfd):
    corpus = write_corpus(tmp_path / "c.txt", documents=40)
    code, _out, err = run_cli(
        capfd,
        "pretrain",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "run",
        "--vocab-size",
        "200",
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    )
    assert code == 0, err
    assert sum(line.startswith("prepare:") for line in err.splitlines()) == 1, err
    assert sum(line.startswith("tokenizer:") for line in err.splitlines()) == 1, err
    assert "\r" not in err and all(line.strip() for line in err.splitlines()), repr(err)


def test_one_file_is_one_file():
    stats = CorpusStats()
    stats.files, stats.formats = 1, {"text": 1}
    assert stats.summary_lines()[0].startswith("corpus: 1 file (1 text), ")
    stats.files, stats.formats = 2, {"text": 2}
    assert stats.summary_lines()[0].startswith("corpus: 2 files (2 text), ")


def manifest(
    train_docs: int, valid_docs: int, train_seqs: int, valid_seqs: int, fraction: float = 0.02
) -> dict:
    return {
        "valid_fraction": fraction,
        "splits": {
            "train": {"documents": train_docs, "sequences": train_seqs, "tokens": 128 * train_seqs},
            "valid": {"documents": valid_docs, "sequences": valid_seqs, "tokens": 128 * valid_seqs},
        },
    }


def test_few_or_huge_documents_are_warned_about():
    # A one-sentence-per-line corpus read as two documents: half held out, not 2%.
    warnings = split_warnings(manifest(1, 1, 1511, 1484), documents=2)
    assert len(warnings) == 2
    assert "only 2 documents" in warnings[0] and "--one-doc-per-line" in warnings[0]
    assert "50% of the sequences are held out (1,484 of 2,995), not the 2% asked" in warnings[1]
    # 120 documents of 8,000 sequences (a million tokens) each: files without blank lines.
    huge = split_warnings(manifest(119, 1, 119 * 8000, 8000, fraction=0.01), documents=120)
    assert len(huge) == 1 and "documents average" in huge[0]
    # An ordinary corpus: nothing to say.
    assert split_warnings(manifest(980, 20, 19_800, 160), documents=1000) == []
    assert split_warnings(manifest(5, 0, 40, 0, fraction=0.0), documents=5) == []


def test_the_demo_corpus_is_in_the_repository():
    data = Path(__file__).resolve().parents[2] / "data"
    assert (data / "enwiki-2015-sample.txt.xz").stat().st_size < 4_000_000
    assert "CC BY-SA" in (data / "README.md").read_text()
    assert len((data / "enwiki-2015-sample-tokenizer" / "vocab.txt").read_text().split()) == 8192
