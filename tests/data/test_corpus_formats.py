"""Corpus formats: each format under each compression, hf: datasets, tokenizer sampling,
and the one-line errors for missing optional packages and bad specs."""

import bz2
import csv
import gzip
import io
import json
import lzma
import random
import sys
import types

import pytest
from conftest import make_document, run_cli

from bertforge.cli.options import parse_size
from bertforge.data.corpus import (
    CorpusOptions,
    CorpusStats,
    estimate_bytes,
    iter_documents,
    resolve_corpus,
)
from bertforge.errors import BertforgeError

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the dev extra")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard", reason="zstandard is in the dev extra")

# Quotes, commas, tabs, newlines and non-ASCII: what a careless writer or reader breaks.
DOCS = [
    "Alpha beta gamma.",
    'She said "hi, there" and left.',
    "Zweite Zeile: café, naïve.",
    "tab\tinside",
    "line one\nline two",
]
COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda b: zstd.ZstdCompressor().compress(b),
}


def encode(fmt: str, docs: list[str], column: str = "body") -> bytes:
    """`docs` in `fmt`, the text under `column` beside an id column."""
    if fmt == "txt":
        return ("\n\n".join(docs) + "\n").encode()
    if fmt == "lines":
        return "".join(d.replace("\n", " ") + "\n" for d in docs).encode()
    if fmt == "jsonl":
        return "".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs)).encode()
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        if fmt == "csv":
            w = csv.writer(out)
            w.writerow(["id", column])
            w.writerows([i, d] for i, d in enumerate(docs))
        else:  # GLUE-style TSV: no quoting, so no tab or newline inside a field
            out.write(f"id\t{column}\n")
            out.writelines(
                f"{i}\t{d.replace(chr(9), ' ').replace(chr(10), ' ')}\n" for i, d in enumerate(docs)
            )
        return out.getvalue().encode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(
            pa.table({"id": list(range(len(docs))), column: docs}), sink, row_group_size=2
        )  # several row groups, several batches
        return sink.getvalue()
    raise AssertionError(fmt)


def expected(fmt: str, docs: list[str]) -> list[str]:
    if fmt == "lines":
        return [d.replace("\n", " ") for d in docs]
    if fmt == "tsv":
        return [d.replace("\t", " ").replace("\n", " ") for d in docs]
    return docs


FORMATS = {
    "txt": ("a.txt", CorpusOptions()),
    "lines": ("a.txt", CorpusOptions(one_doc_per_line=True)),
    "jsonl": ("a.jsonl", CorpusOptions(text_field="body")),
    "csv": ("a.csv", CorpusOptions(text_column="body")),
    "tsv": ("a.tsv", CorpusOptions(text_column="body")),
    "parquet": ("a.parquet", CorpusOptions(text_column="body")),
}


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_and_compression_round_trips(tmp_path, fmt, compression):
    name, options = FORMATS[fmt]
    path = tmp_path / (name + compression)
    path.write_bytes(COMPRESS[compression](encode(fmt, DOCS)))
    stats = CorpusStats()
    docs = list(iter_documents(resolve_corpus([path]), stats, options))
    assert docs == expected(fmt, DOCS)
    kind = {"txt": "text", "lines": "text"}.get(fmt, fmt)
    assert stats.formats == {kind + compression: 1}
    assert stats.problems() == ""


def test_mixed_directory_of_every_format(tmp_path):
    for i, (fmt, (name, _)) in enumerate(FORMATS.items()):
        if fmt == "lines":
            continue
        compression = list(COMPRESS)[i % len(COMPRESS)]
        (tmp_path / f"{i}-{name}{compression}").write_bytes(
            COMPRESS[compression](encode(fmt, [f"document {i}"], column="text"))
        )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "wiki_00.bz2").write_bytes(
        bz2.compress(b'<doc id="1" title="T">\nT\nwiki body\n</doc>\n')
    )
    stats = CorpusStats()
    docs = list(iter_documents(resolve_corpus([tmp_path]), stats))
    assert sorted(docs) == [
        "document 0",
        "document 2",
        "document 3",
        "document 4",
        "document 5",
        "wiki body",
    ]
    assert stats.formats == {
        "text": 1,
        "jsonl.bz2": 1,
        "csv.xz": 1,
        "tsv.zst": 1,
        "parquet": 1,
        "wikiextractor.bz2": 1,
    }


def test_csv_quoted_newlines_short_rows_and_missing_column(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('title,text\nA,"two\nlines, quoted"\nB\nC,plain\n')
    stats = CorpusStats()
    assert list(iter_documents([f], stats)) == ["two\nlines, quoted", "plain"]
    assert stats.bad_lines == 1  # row "B" has no text column
    other = tmp_path / "b.csv"
    other.write_text("title,body\nx,y\n")
    stats = CorpusStats()
    assert list(iter_documents([other, f], stats)) == ["two\nlines, quoted", "plain"]
    assert stats.unreadable == [
        f"{other}: no column 'text' (columns: title, body); choose one with --text-column"
    ]


def test_bad_parquet_is_skipped_by_name(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    stats = CorpusStats()
    assert list(iter_documents([bad, numbers, good], stats)) == ["fine"]
    assert [u.split(": ")[0] for u in stats.unreadable] == [str(bad), str(numbers)]
    assert "holds int64, not text" in stats.unreadable[1]


def test_parquet_nulls_are_empty_documents(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two\x00"]}), f)
    stats = CorpusStats()
    assert list(iter_documents([f], stats)) == ["one", "two"]
    assert (stats.empty_documents, stats.control_chars, stats.bytes) == (1, 1, 7)


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path):
    z = tmp_path / "a.txt.zst"
    frame = zstd.ZstdCompressor().compress
    z.write_bytes(frame(b"one\n\n") + frame(b"two\n"))
    g = tmp_path / "b.txt.gz"
    g.write_bytes(gzip.compress(b"three\n\n") + gzip.compress(b"four\n"))
    assert list(iter_documents([z, g])) == ["one", "two", "three", "four"]


def test_estimate_bytes_reads_the_gzip_size(tmp_path):
    text = b"some words here\n" * 1000
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b.txt").write_bytes(text)
    assert estimate_bytes(resolve_corpus([tmp_path])) == 2 * len(text)
    assert estimate_bytes(["hf:wikitext"]) is None


def fake_datasets(rows: list[dict]) -> tuple[types.ModuleType, list]:
    """A stand-in for the datasets package: records its calls, yields `rows`."""
    calls: list = []
    module = types.ModuleType("datasets")

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return iter(rows)

    module.load_dataset = load_dataset
    return module, calls


def test_hf_spec_streams_the_train_split(tmp_path, monkeypatch):
    module, calls = fake_datasets(
        [{"content": "first doc"}, {"content": None}, {"content": "second\x1b doc"}]
    )
    monkeypatch.setitem(sys.modules, "datasets", module)
    local = tmp_path / "a.txt"
    local.write_text("local doc\n")
    sources = resolve_corpus(["hf:org/set:en", local, "hf:missing/set"])
    assert sources == ["hf:org/set:en", local, "hf:missing/set"]
    stats = CorpusStats()
    docs = list(iter_documents(sources, stats, CorpusOptions(text_column="content")))
    assert docs == ["first doc", "second doc", "local doc"]
    assert calls == [("org/set", "en", "train", True), ("missing/set", None, "train", True)]
    assert (stats.bad_lines, stats.control_chars, stats.unreadable_files) == (1, 1, 1)
    assert stats.formats == {"hf": 2, "text": 1}
    assert stats.unreadable[0].startswith("hf:missing/set: Dataset 'missing/set'")


@pytest.mark.parametrize("spec", ["hf:", "hf:a:b:c", "hf:with space", "hf::cfg"])
def test_cli_bad_hf_spec_is_one_line(tmp_path, capsys, spec):
    code, _, err = run_cli(capsys, "tokenizer", spec, "--out", tmp_path / "tok")
    assert code == 2
    assert err.strip().splitlines() == [
        f"bertforge: error: bad corpus spec {spec!r}: expected hf:NAME or hf:NAME:CONFIG "
        "(e.g. hf:wikitext:wikitext-103-raw-v1)"
    ]


def test_cli_missing_datasets_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code, _, err = run_cli(
        capsys, "tokenizer", "hf:wikitext:wikitext-2-raw-v1", "--out", tmp_path / "tok"
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "bertforge: error: reading hf:wikitext:wikitext-2-raw-v1 needs the datasets package: "
        "pip install 'bertforge[datasets]'"
    ]


@pytest.mark.parametrize("name, module", [("a.parquet", "pyarrow"), ("a.txt.zst", "zstandard")])
def test_cli_missing_format_package_is_one_line(
    tmp_path, capsys, monkeypatch, tokenizer_dir, name, module
):
    (tmp_path / name).write_bytes(b"anything")
    for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, module, None)
    code, _, err = run_cli(
        capsys, "prepare", tmp_path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "data"
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"bertforge: error: reading {name} needs the {module} package: "
        "pip install 'bertforge[formats]'"
    ]


def test_resolve_rejects_bad_hf_spec_before_reading():
    with pytest.raises(BertforgeError, match="bad corpus spec 'hf:a:b:c'"):
        resolve_corpus(["hf:a:b:c"])


def test_parse_size():
    assert parse_size("2000") == 2000
    assert parse_size("500M") == 500_000_000
    assert parse_size("2G") == parse_size("2gb") == 2_000_000_000
    assert parse_size("1.5k") == 1500
    assert parse_size("64KiB") == 65536
    for bad in ["", "abc", "5X", "-1M", "0"]:
        with pytest.raises(Exception, match="invalid size"):
            parse_size(bad)


def write_files(tmp_path, sizes: list[int]) -> list:
    """Files of `sizes` generated documents each (different seeds: no duplicates)."""
    paths = []
    for i, n in enumerate(sizes):
        rng = random.Random(i)
        p = tmp_path / f"part-{i}.txt"
        p.write_text("\n\n".join(make_document(rng) for _ in range(n)) + "\n")
        paths.append(p)
    return paths


def test_sample_bytes_spreads_over_files_by_size(tmp_path):
    files = write_files(tmp_path, [200, 100, 100])
    total = sum(p.stat().st_size for p in files)
    sample = total // 4
    first = list(iter_documents(files, sample_bytes=sample))
    again = list(iter_documents(files, sample_bytes=sample))
    assert first == again  # deterministic
    fed = sum(len(d.encode()) for d in first)
    longest = max(len(d.encode()) for d in first)
    assert sample <= fed <= sample + 3 * longest  # at most one document over per file
    # Each file gives its first documents, about in proportion to its size (2:1:1).
    by_file = [len(set(first) & set(iter_documents([p]))) for p in files]
    assert all(n > 0 for n in by_file)
    assert abs(by_file[0] - by_file[1] - by_file[2]) <= 2


def test_tokenizer_sample_bytes_feeds_less(tmp_path, monkeypatch, capsys):
    from bertforge.data import tokenizer

    files = write_files(tmp_path, [150, 150])
    total = sum(p.stat().st_size for p in files)
    fed: list[int] = []
    real_batches = tokenizer.batched

    def counting(docs, *limits):
        for batch in real_batches(docs, *limits):
            fed.append(sum(len(d.encode()) for d in batch))
            yield batch

    monkeypatch.setattr(tokenizer, "batched", counting)
    sample = total // 5000 * 1000
    code, _, err = run_cli(
        capsys,
        "tokenizer",
        *files,
        "--out",
        tmp_path / "tok",
        "--vocab-size",
        120,
        "--sample-bytes",
        f"{sample // 1000}k",
    )
    assert code == 0, err
    sampled = sum(fed)
    assert sample <= sampled < sample + 2_000  # a document or two past the target
    assert "a sample of about" in err

    fed.clear()
    stats = CorpusStats()
    tokenizer.train_tokenizer(
        [str(p) for p in files], tmp_path / "tok2", vocab_size=120, show_progress=False, stats=stats
    )
    assert sum(fed) > 4 * sampled  # the whole corpus
    assert stats.documents == 300


def test_pretrain_passes_the_corpus_flags_to_its_data_building(tmp_path, capsys, monkeypatch):
    from bertforge.commands import pretrain

    f = tmp_path / "corpus.csv"
    rows = [make_document(random.Random(i)) for i in range(60)]
    f.write_text("id,body\n" + "".join(f'{i},"{r}"\n' for i, r in enumerate(rows)))
    seen = {}
    real_build = pretrain.build_data

    def build_then_stop(*args, **kw):  # the data is what this test is about: no training
        seen["kw"] = kw
        real_build(*args, **kw)  # (the failed start then removes what it built)
        seen["manifest"] = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
        raise BertforgeError("stopped after building the data")

    monkeypatch.setattr(pretrain, "build_data", build_then_stop)
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--corpus",
        f,
        "--out",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--vocab-size",
        120,
        "--seq-len",
        32,
        "--max-steps",
        1,
        "--text-column",
        "body",
        "--dedup",
        "--sample-bytes",
        "2k",
        "--quiet",
    )
    assert (code, err.strip().splitlines()[-1]) == (
        2,
        "bertforge: error: stopped after building the data",
    )
    options, sample_bytes = seen["kw"]["corpus_options"], seen["kw"]["sample_bytes"]
    assert options == CorpusOptions(text_column="body", dedup=True)
    assert sample_bytes == 2000
    manifest = seen["manifest"]
    assert manifest["corpus_stats"]["documents"] == 60
    assert manifest["corpus_stats"]["formats"] == {"csv": 1}
