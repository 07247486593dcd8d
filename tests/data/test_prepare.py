"""Token shards: packing, the validation split, the manifest, determinism and errors."""

import hashlib
import json
import logging
import random

import numpy as np
import pytest

from bertforge.data.prepare import load_manifest, open_split, prepare
from bertforge.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from bertforge.errors import BertforgeError

PAD, CLS, SEP = 0, 2, 3
WORDS = (
    "the a of and to in is was for on with as by at from that this it river mountain village "
    "city castle garden history music science language winter summer railway station library "
    "museum bridge forest ancient northern famous small built opened founded played wrote "
    "studied visited described named became"
).split()


def make_docs(n, seed=0, max_sentences=6):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."
            for _ in range(rng.randint(1, max_sentences))
        ]
        docs.append(" ".join(sentences).capitalize())
    return docs


def write_corpus(path, docs):
    path.write_text("\n\n".join(docs) + "\n")
    return path


def goes_to_valid(doc, fraction):
    return int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 10_000 < fraction * 10_000


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(root / "corpus.txt", make_docs(60, seed=1))
    return train_tokenizer([str(corpus)], root / "tokenizer", vocab_size=200, show_progress=False)


@pytest.fixture(scope="module")
def docs():
    return make_docs(80)


@pytest.fixture(scope="module")
def data(tok_dir, docs, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus.txt", docs)
    manifest = prepare(
        [str(corpus)],
        tok_dir,
        root / "data",
        seq_len=16,
        valid_fraction=0.2,
        shard_sequences=50,
        show_progress=False,
    )
    return root / "data", manifest


def doc_ids(tok_dir, docs):
    tok = load_tokenizer(tok_dir)
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def all_rows(data_dir, split):
    maps = open_split(data_dir, split)
    return np.concatenate([np.asarray(m) for m in maps]) if maps else np.empty((0, 16))


def test_manifest_contents(data, tok_dir, docs):
    data_dir, manifest = data
    assert load_manifest(data_dir) == manifest
    assert manifest["format"] == "bertforge-shards" and manifest["version"] == 1
    assert manifest["seq_len"] == 16 and manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == load_tokenizer(tok_dir).get_vocab_size()
    assert manifest["tokenizer_hash"] == tokenizer_hash(tok_dir)
    assert manifest["tokenizer_hash"] == tokenizer_hash(data_dir / "tokenizer")
    assert manifest["special_token_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest["corpus_stats"]["documents"] == len(docs)
    assert len(manifest["corpus_files"]) == 1
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["valid"]["documents"] == len(docs)
    assert splits["train"]["tokens"] + splits["valid"]["tokens"] == sum(
        map(len, doc_ids(tok_dir, docs))
    )
    for name, split in splits.items():
        assert split["sequences"] == sum(s["sequences"] for s in split["shards"])
        assert all(0 < s["sequences"] <= 50 for s in split["shards"])
        files = sorted(p.name for p in data_dir.glob(f"{name}-*.bin"))
        assert files == [s["file"] for s in split["shards"]]
        rows = all_rows(data_dir, name)
        assert rows.shape == (split["sequences"], 16) and rows.dtype == np.uint16
        assert split["tokens"] == int(np.isin(rows, [PAD, CLS, SEP], invert=True).sum())
    assert len(splits["train"]["shards"]) > 1  # shard_sequences=50 forces several
    assert (data_dir / "tokenizer" / "vocab.txt").is_file()
    assert not [p for p in data_dir.parent.iterdir() if p.name.startswith(".")]


def test_sequences_are_cls_body_sep(data):
    data_dir, _manifest = data
    for split in ("train", "valid"):
        rows = all_rows(data_dir, split)
        assert (rows[:, 0] == CLS).all()
        assert (rows[:-1, -1] == SEP).all()
        assert not (rows[:, 1] == SEP).any()  # no body opens with the joining [SEP]
        assert not (rows[:-1] == PAD).any()  # only the last sequence is padded
        last = rows[-1]
        if last[-1] != SEP:  # the final partial sequence: [CLS] body [SEP] [PAD]...
            n = int((last != PAD).sum())
            assert last[n - 1] == SEP and (last[n:] == PAD).all()


def test_shards_decode_back_to_the_documents(data, tok_dir, docs):
    data_dir, _ = data
    ids = doc_ids(tok_dir, docs)
    for split, want_valid in (("train", False), ("valid", True)):
        expected = [i for d, i in zip(docs, ids) if goes_to_valid(d, 0.2) == want_valid]
        assert expected, "the fixture should fill both splits"
        rows = all_rows(data_dir, split)
        stream = rows[:, 1:].ravel()
        stream = stream[stream != PAD][:-1]  # bodies and the [SEP]s that join documents
        text = stream[stream != SEP]
        assert text.tolist() == [t for doc in expected for t in doc]
        assert rows.tolist() == reference_rows(expected, 16)


def reference_rows(docs, seq_len):
    """The packing rule written plainly: docs joined by [SEP], cut into [CLS] body [SEP]."""
    stream = []
    for doc in docs:
        stream += ([SEP] if stream else []) + doc
    rows, pos = [], 0
    while pos < len(stream):
        if stream[pos] == SEP:  # a body never opens with the joining [SEP]
            pos += 1
            continue
        body = stream[pos : pos + seq_len - 2]
        pos += len(body)
        rows.append([CLS] + body + [SEP] + [PAD] * (seq_len - 2 - len(body)))
    return rows


def test_valid_split_is_by_document_and_order_independent(tok_dir, docs, tmp_path):
    a = write_corpus(tmp_path / "a.txt", docs[:40])
    b = write_corpus(tmp_path / "b.txt", docs[40:])
    m1 = prepare(
        [str(a), str(b)],
        tok_dir,
        tmp_path / "ab",
        seq_len=16,
        valid_fraction=0.2,
        show_progress=False,
    )
    m2 = prepare(
        [str(b), str(a)],
        tok_dir,
        tmp_path / "ba",
        seq_len=16,
        valid_fraction=0.2,
        show_progress=False,
    )
    n_valid = sum(goes_to_valid(d, 0.2) for d in docs)
    assert m1["splits"]["valid"]["documents"] == m2["splits"]["valid"]["documents"] == n_valid
    assert m1["splits"]["valid"]["tokens"] == m2["splits"]["valid"]["tokens"]


def test_prepare_twice_is_byte_identical(data, tok_dir, tmp_path):
    data_dir, manifest = data
    again = prepare(
        manifest["corpus_files"],
        tok_dir,
        tmp_path / "again",
        seq_len=16,
        valid_fraction=0.2,
        shard_sequences=50,
        show_progress=False,
    )
    for split in again["splits"].values():
        for shard in split["shards"]:
            assert (tmp_path / "again" / shard["file"]).read_bytes() == (
                data_dir / shard["file"]
            ).read_bytes()
    # Preparing into an existing data directory replaces it.
    prepare(manifest["corpus_files"], tok_dir, tmp_path / "again", seq_len=32, show_progress=False)
    assert load_manifest(tmp_path / "again")["seq_len"] == 32


def test_tiny_corpus_still_gets_a_valid_document(tok_dir, tmp_path):
    docs = make_docs(3, seed=5)
    assert not any(goes_to_valid(d, 0.01) for d in docs)
    m = prepare(
        [str(write_corpus(tmp_path / "c.txt", docs))],
        tok_dir,
        tmp_path / "d",
        seq_len=16,
        show_progress=False,
    )
    assert (m["splits"]["train"]["documents"], m["splits"]["valid"]["documents"]) == (2, 1)
    want = doc_ids(tok_dir, docs[-1:])[0]
    rows = all_rows(tmp_path / "d", "valid")
    assert rows[np.isin(rows, [PAD, CLS, SEP], invert=True)].tolist() == want


def test_single_document_goes_to_train(tok_dir, tmp_path, caplog):
    corpus = write_corpus(tmp_path / "c.txt", make_docs(1, seed=2))
    with caplog.at_level(logging.WARNING):
        m = prepare([str(corpus)], tok_dir, tmp_path / "d", seq_len=16, show_progress=False)
    assert (m["splits"]["train"]["documents"], m["splits"]["valid"]["documents"]) == (1, 0)
    assert m["splits"]["valid"]["shards"] == [] and open_split(tmp_path / "d", "valid") == []
    assert "validation split is empty" in caplog.text


@pytest.mark.parametrize(
    "n, seed, fraction, expected", [(1, 94, 0.01, (1, 0)), (3, 8, 0.5, (1, 2))]
)
def test_train_is_never_empty(tok_dir, tmp_path, n, seed, fraction, expected):
    docs = make_docs(n, seed=seed)
    assert all(goes_to_valid(d, fraction) for d in docs)  # hashing alone leaves train empty
    m = prepare(
        [str(write_corpus(tmp_path / "c.txt", docs))],
        tok_dir,
        tmp_path / "d",
        seq_len=16,
        valid_fraction=fraction,
        show_progress=False,
    )
    assert (m["splits"]["train"]["documents"], m["splits"]["valid"]["documents"]) == expected
    assert m["splits"]["train"]["tokens"] == len(doc_ids(tok_dir, docs[-1:])[0])


def test_special_token_text_is_plain_text(tok_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", ["the river [SEP] the [MASK] city [PAD]"])
    prepare(
        [str(corpus)], tok_dir, tmp_path / "d", seq_len=64, valid_fraction=0.0, show_progress=False
    )
    row = all_rows(tmp_path / "d", "train")[0]
    body = row[1 : int((row != PAD).sum()) - 1]
    assert not np.isin(body, [PAD, CLS, SEP, 4]).any()  # [UNK] is fine: "[" is unseen


def test_memmaps_are_read_only(data):
    data_dir, _ = data
    shard = open_split(data_dir, "train")[0]
    with pytest.raises(ValueError):
        shard[0, 0] = 7


def test_errors(tok_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    ok = write_corpus(tmp_path / "ok.txt", make_docs(2))
    out = tmp_path / "out"
    with pytest.raises(BertforgeError, match="no documents"):
        prepare([str(empty)], tok_dir, out, show_progress=False)
    with pytest.raises(BertforgeError, match=r"not found: .*missing.txt"):
        prepare([str(tmp_path / "missing.txt")], tok_dir, out, show_progress=False)
    with pytest.raises(BertforgeError, match="tokenizer directory not found"):
        prepare([str(ok)], tmp_path / "no-tok", out, show_progress=False)
    with pytest.raises(BertforgeError, match="seq_len 4"):
        prepare([str(ok)], tok_dir, out, seq_len=4, show_progress=False)
    with pytest.raises(BertforgeError, match="not a data directory"):
        prepare([str(ok)], tok_dir, tmp_path, show_progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial dirs


def test_load_manifest_errors(data, tmp_path):
    data_dir, manifest = data
    with pytest.raises(BertforgeError, match=r"no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(BertforgeError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(BertforgeError, match="version 2"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BertforgeError, match="missing"):  # the shards are not here
        open_split(tmp_path, "train")
    with pytest.raises(BertforgeError, match="no split 'test'"):
        open_split(data_dir, "test")
