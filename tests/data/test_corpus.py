"""Corpus reading: formats, decoding, file resolution and the counts in CorpusStats."""

import gzip
import json
import os
import tracemalloc

import pytest
from conftest import run_cli

from bertforge.data import corpus, readers
from bertforge.data.corpus import CorpusOptions, CorpusStats, iter_documents, resolve_corpus
from bertforge.errors import BertforgeError


def read(*paths, **kw):
    stats = CorpusStats()
    docs = list(iter_documents(paths, stats, **kw))
    return docs, stats


def test_plain_text_blank_lines_separate_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc line one\nline two\n\n\n  second doc  \n\nthird\n")
    docs, stats = read(f)
    assert docs == ["first doc line one\nline two", "second doc", "third"]
    assert (stats.files, stats.documents, stats.empty_documents) == (1, 3, 0)
    assert stats.bytes == f.stat().st_size


def test_crlf_line_endings(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    docs, _ = read(f)
    assert docs == ["one\ntwo", "three"]


def test_jsonl_text_field_and_bad_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    lines = [
        json.dumps({"text": "alpha beta", "id": 1}),
        "{not json",
        json.dumps({"body": "x"}),
        "",
        json.dumps({"text": "  "}),
        json.dumps(["text"]),
        json.dumps({"text": "gamma"}),
    ]
    f.write_text("\n".join(lines) + "\n")
    docs, stats = read(f)
    assert docs == ["alpha beta", "gamma"]
    assert stats.bad_lines == 3  # bad JSON, missing field, not an object
    assert stats.empty_documents == 1

    docs, stats = read(f, options=CorpusOptions(text_field="body"))
    assert docs == ["x"]


def test_gzip_is_read_through(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps({"text": "zipped"}) + "\n")
    t = tmp_path / "b.txt.gz"
    with gzip.open(t, "wt") as g:
        g.write("p one\n\np two\n")
    docs, stats = read(f, t)
    assert docs == ["zipped", "p one", "p two"]
    assert stats.files == 2


def test_wikiextractor_blocks(tmp_path):
    f = tmp_path / "wiki_00"
    f.write_text(
        '\n<doc id="1" url="http://x/?curid=1" title="Alpha">\nAlpha\n\n'
        "Alpha is the first letter.\n\nIt has a second paragraph.\n</doc>\n"
        '<doc id="2" url="http://x/?curid=2" title="Beta">\nBeta\n</doc>\n'
        '<doc id="3" url="http://x/?curid=3" title="Gamma">\nGamma\nGamma follows beta.\n</doc>\n'
    )
    docs, stats = read(f)
    assert docs == [
        "Alpha is the first letter.\n\nIt has a second paragraph.",
        "Gamma follows beta.",
    ]
    assert stats.empty_documents == 1  # "Beta" had only its title line


def test_formats_detected_per_file(tmp_path):
    (tmp_path / "wiki").write_text('<doc id="1" title="T">\nT\nbody text\n</doc>\n')
    (tmp_path / "plain").write_text("a\n\nb\n")
    docs, _ = read(*resolve_corpus([str(tmp_path)]))
    assert docs == ["a", "b", "body text"]  # sorted: plain, wiki


def test_invalid_utf8_replaced_and_counted(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"caf\xc3\xa9 ok\n\nbad \xff\xfe bytes\n\nreal \xef\xbf\xbd stays\n")
    docs, stats = read(f)
    assert docs == ["café ok", "bad \ufffd\ufffd bytes", "real \ufffd stays"]
    assert stats.decode_errors == 2  # the U+FFFD already in the text is not an error


def test_utf8_bom_dropped(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read(f)[0] == ["hello"]


def test_empty_file_gives_no_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n   \n")
    docs, stats = read(f)
    assert docs == [] and stats.documents == 0 and stats.files == 1


def test_resolve_directory_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b.txt", "a.txt", "sub/c.txt", ".hidden.txt", ".git/x.txt", "sub/.y.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x\n")
    got = [p.relative_to(tmp_path).as_posix() for p in resolve_corpus([str(tmp_path)])]
    assert got == ["a.txt", "b.txt", "sub/c.txt"]


def test_resolve_glob_order_and_dedup(tmp_path):
    for name in ["x2.txt", "x1.txt", "y.jsonl"]:
        (tmp_path / name).write_text("x\n")
    got = resolve_corpus([str(tmp_path / "y.jsonl"), str(tmp_path / "x*.txt"), str(tmp_path)])
    assert [p.name for p in got] == ["y.jsonl", "x1.txt", "x2.txt"]


def test_missing_path_and_empty_glob_raise(tmp_path):
    with pytest.raises(BertforgeError, match=r"not found: .*nope.txt"):
        resolve_corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(BertforgeError, match=r"no corpus files match .*\*.md"):
        resolve_corpus([str(tmp_path / "*.md")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertforgeError, match="no files"):
        resolve_corpus([str(tmp_path / "empty")])


def test_stats_as_dict():
    assert set(CorpusStats().as_dict()) == {
        "files",
        "documents",
        "bytes",
        "empty_documents",
        "decode_errors",
        "bad_lines",
        "control_chars",
        "duplicate_documents",
        "long_lines",
        "split_documents",
        "oversized_records",
        "unreadable_files",
        "unreadable",
        "formats",
    }


def test_corrupt_gzip_is_skipped_by_name_and_the_run_goes_on(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"some text\n" * 100)[:-30] + b"garbage" * 5)
    good = tmp_path / "good.txt"
    good.write_text("kept\n")
    docs, stats = read(bad, good)
    assert docs == ["kept"]
    assert (stats.files, stats.unreadable_files) == (2, 1)
    assert stats.unreadable[0].startswith(f"{bad}: ")
    assert stats.formats == {"text.gz": 1, "text": 1}


def test_nothing_readable_is_an_error_naming_a_file(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(BertforgeError, match=r"no corpus file could be read .*bad.txt.gz"):
        read(bad)


def test_problems_summarises_what_was_skipped():
    assert CorpusStats().problems() == ""
    stats = CorpusStats(bad_lines=3, decode_errors=1200)
    assert stats.problems() == "1,200 undecodable characters replaced, 3 bad records skipped"
    assert CorpusStats(unreadable_files=1).problems() == "1 unreadable file skipped"


def test_control_characters_removed_and_counted(tmp_path):
    f = tmp_path / "a.txt"
    # NUL, ESC and a C1 control (U+0085) go; tab stays; form feed becomes a space.
    f.write_bytes("a\x00b\x1bc\td\x0ce \u0085f\n\nclean\n".encode())
    docs, stats = read(f)
    assert docs == ["abc\td e f", "clean"]
    assert stats.control_chars == 4


def test_lone_cr_and_crlf_split_between_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 4)  # "one\r" | "\ntwo" ...: CRLF cut in two
    f = tmp_path / "a.txt"
    f.write_bytes(b"one\r\ntwo\r\rthree\rfour\r\n")
    docs, stats = read(f)
    assert docs == ["one\ntwo", "three\nfour"]  # CR CR is a blank line: a new document
    assert stats.bytes == f.stat().st_size


def test_multibyte_characters_and_bad_bytes_across_block_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 3)
    f = tmp_path / "a.txt"
    text = "日本語のテキスト \ufffd ok"
    f.write_bytes(text.encode() + b" \xff\xfe end\n")
    docs, stats = read(f)
    assert docs == [text + " \ufffd\ufffd end"]
    assert stats.decode_errors == 2


def test_dedup_drops_exact_repeats_across_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("same text\n\nother\n\nsame text\n")
    b.write_text(json.dumps({"text": "  same text "}) + "\n" + json.dumps({"text": "new"}) + "\n")
    docs, stats = read(a, b, options=CorpusOptions(dedup=True))
    assert docs == ["same text", "other", "new"]
    assert (stats.documents, stats.duplicate_documents) == (3, 2)
    docs, stats = read(a, b)
    assert len(docs) == 5 and stats.duplicate_documents == 0


def test_json_escapes_cleaned_lone_surrogates_replaced(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x\\u0000y"}\n{"text": "lone \\ud800 half"}\n' + "[" * 5000 + "\n")
    docs, stats = read(f)
    assert docs == ["xy", "lone \ufffd half"]
    assert (stats.control_chars, stats.decode_errors, stats.bad_lines) == (1, 1, 1)


def test_single_line_of_50_mb_streams_in_bounded_memory(tmp_path):
    f = tmp_path / "one-line.txt"
    words = 10_000_000
    with open(f, "wb") as out:
        for _ in range(10):
            out.write(b"word " * (words // 10))  # 50 MB, no newline at all
    tracemalloc.start()
    try:
        stats = CorpusStats()
        count = longest = pieces = 0
        for doc in iter_documents([f], stats):
            count += doc.count("word")
            longest = max(longest, len(doc))
            pieces += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    limit = CorpusOptions().max_document_chars
    assert count == words  # nothing lost or repeated at the cuts (made at spaces)
    assert longest <= limit and pieces >= 50_000_000 // limit
    assert peak < 12 * limit  # a few blocks and pieces, not the 50 MB line
    assert (stats.long_lines, stats.split_documents) == (1, 1)


def test_long_line_without_spaces_is_cut_between_characters(tmp_path):
    f = tmp_path / "a.txt"
    text = "日本語" * 1000  # 9,000 bytes, no whitespace
    f.write_text(text + "\n")
    docs, stats = read(f, options=CorpusOptions(one_doc_per_line=True, max_document_chars=100))
    assert "".join(docs) == text and stats.decode_errors == 0
    assert all(len(d.encode()) <= 100 for d in docs)
    assert stats.long_lines == 1


def test_long_document_of_many_lines_is_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(["ten chars."] * 100) + "\n\nnext\n")
    docs, stats = read(f, options=CorpusOptions(max_document_chars=105))
    assert all(len(d) <= 105 for d in docs) and docs[-1] == "next"
    assert sum(d.count("ten chars.") for d in docs) == 100
    assert (stats.split_documents, stats.long_lines) == (1, 0)


def test_oversized_json_line_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 16)
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "x" * 500}) + "\n" + json.dumps({"text": "small"}) + "\n")
    docs, stats = read(f, options=CorpusOptions(max_record_chars=100))
    assert docs == ["small"]
    assert (stats.oversized_records, stats.bad_lines) == (1, 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_file_is_skipped(tmp_path):
    locked, good = tmp_path / "locked.txt", tmp_path / "good.txt"
    locked.write_text("secret\n")
    good.write_text("open\n")
    locked.chmod(0)
    docs, stats = read(locked, good)
    assert docs == ["open"]
    assert stats.unreadable == [f"{locked}: Permission denied"]


def test_dirty_corpus_counts_in_manifest_and_summary(tmp_path, tokenizer_dir, capsys, monkeypatch):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_bytes(
        b"caf\xc3\xa9 one\r\n\r\nbad \xff bytes here\r\n\r\n"
        b"nul\x00 and esc\x1b chars\rlone cr line\n\n\n   \n\ndup doc\n\ndup doc\n"
    )
    (src / "b.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"text": "dup doc"}),
                json.dumps({"text": "  "}),
                "{broken",
                '{"text": "x\\u0000y"}',
                '{"text": "lone \\ud800 surrogate"}',
            ]
        )
        + "\n"
    )
    lost = gzip.compress("".join(f"lost line {i}\n" for i in range(1000)).encode())
    (src / "c.txt.gz").write_bytes(lost[: len(lost) // 2])  # truncated
    (src / "d.txt").write_text("forbidden\n")
    real_open = readers._open

    def no_permission(path, compression):  # tests may run as root, who can read anything
        if path.name == "d.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, compression)

    monkeypatch.setattr(corpus, "_open", no_permission)  # defined in readers, called by corpus
    out = tmp_path / "data"
    code, _, err = run_cli(
        capsys,
        "prepare",
        src,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        out,
        "--seq-len",
        16,
        "--dedup",
    )
    assert code == 0, err
    stats = json.loads((out / "manifest.json").read_text())["corpus_stats"]
    assert {k: v for k, v in stats.items() if k not in ("bytes", "unreadable")} == {
        "files": 4,
        "documents": 6,
        "empty_documents": 1,
        "decode_errors": 2,
        "bad_lines": 1,
        "control_chars": 3,
        "duplicate_documents": 2,
        "long_lines": 0,
        "split_documents": 0,
        "oversized_records": 0,
        "unreadable_files": 2,
        "formats": {"jsonl": 1, "text": 2, "text.gz": 1},
    }
    assert [u.split(": ")[0] for u in stats["unreadable"]] == [
        str(src / "c.txt.gz"),
        str(src / "d.txt"),
    ]
    assert "corpus: 4 files (1 jsonl, 2 text, 1 text.gz), 6 documents" in err
    assert (
        "corpus: 2 undecodable characters replaced, 3 control characters removed, "
        "1 bad record skipped, 1 empty document skipped, 2 duplicate documents dropped, "
        "2 unreadable files skipped"
    ) in err
    assert f"unreadable, skipped: {src / 'c.txt.gz'}: " in err
    assert f"unreadable, skipped: {src / 'd.txt'}: Permission denied" in err
