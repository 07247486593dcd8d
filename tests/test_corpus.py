"""Corpus reading: formats, decoding, file resolution and the counts in CorpusStats."""

import gzip
import json

import pytest

from bertforge.data.corpus import CorpusStats, iter_documents, resolve_corpus
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
    lines = [json.dumps({"text": "alpha beta", "id": 1}), "{not json", json.dumps({"body": "x"}),
             "", json.dumps({"text": "  "}), json.dumps(["text"]), json.dumps({"text": "gamma"})]
    f.write_text("\n".join(lines) + "\n")
    docs, stats = read(f)
    assert docs == ["alpha beta", "gamma"]
    assert stats.bad_lines == 3  # bad JSON, missing field, not an object
    assert stats.empty_documents == 1

    docs, stats = read(f, text_field="body")
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
    assert docs == ["Alpha is the first letter.\n\nIt has a second paragraph.",
                    "Gamma follows beta."]
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
    with pytest.raises(BertforgeError, match="not found: .*nope.txt"):
        resolve_corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(BertforgeError, match=r"no corpus files match .*\*.md"):
        resolve_corpus([str(tmp_path / "*.md")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertforgeError, match="no files"):
        resolve_corpus([str(tmp_path / "empty")])


def test_stats_as_dict():
    assert set(CorpusStats().as_dict()) == {"files", "documents", "bytes", "empty_documents",
                                            "decode_errors", "bad_lines"}


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
    f = tmp_path / "bad.txt.gz"
    f.write_bytes(gzip.compress(b"some text\n" * 100)[:-30] + b"garbage" * 5)
    with pytest.raises(BertforgeError, match="bad.txt.gz"):
        read(f)


def test_problems_summarises_what_was_skipped():
    assert CorpusStats().problems() == ""
    stats = CorpusStats(bad_lines=3, decode_errors=1200)
    assert stats.problems() == "1,200 undecodable characters replaced, 3 bad JSON lines skipped"
