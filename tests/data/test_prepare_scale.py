"""prepare at scale: the exact chunk cache, workers, document boundaries, corpus parts,
several data directories read as one, and batches drawn across shards."""

from __future__ import annotations

import functools
import json
import operator
import os
import random

import numpy as np
import pytest
from conftest import make_document, run_cli

from bertforge.data import encode as encode_mod
from bertforge.data import prepare as prepare_mod
from bertforge.data.corpus import iter_documents
from bertforge.data.encode import BatchEncoder, sequential_tokenizers
from bertforge.data.loader import PretrainBatches, ShardedSequences
from bertforge.data.masking import Masker
from bertforge.data.prepare import load_manifest, open_split, prepare
from bertforge.data.tokenizer import load_tokenizer, train_tokenizer
from bertforge.errors import BertforgeError

PAD, CLS, SEP, MASK = 0, 2, 3, 4
# Text the chunk cache must not get wrong: accents precomposed and combining (also right
# after a space), CJK, Greek final sigma, dotted I, control and format characters, other
# spaces (NBSP, tab, U+2028, U+001C), U+FFFD, special-token spellings, over-long words.
TRICKY = [
    "café",
    "cafe\u0301",
    "\u0301a",
    "naïve",
    "Ångström",
    "中文字",
    "東京タワー",
    "ΟΔΟΣ",
    "İstanbul",
    "a\x1cb",
    "x\u200by",
    "soft\u00adhyphen",
    "a\u00a0b",
    "tab\there",
    "line\u2028sep",
    "\ufffd",
    "[SEP]",
    "[MASK]",
    "x[CLS]y",
    "[PAD][UNK]",
    "(word),",
    "end.",
    "...",
    "e-mail",
    "a" * 120,
    "ﬁne",
    "①②",
    "🙂ok",
    "\u0301",
    "  ",
    "Σσς",
]


def tricky_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "river", "city", "old", "garden", "music", "science", "of", "and", "a", "in"]
    docs = []
    for _ in range(n):
        parts = [
            rng.choice(TRICKY) if rng.random() < 0.3 else rng.choice(words)
            for _ in range(rng.randint(1, 40))
        ]
        seps = [rng.choice([" ", " ", " ", "  ", "\n", " \n "]) for _ in parts]
        docs.append("".join(p + s for p, s in zip(parts, seps)).strip() or "x")
    return docs


@pytest.fixture(scope="module", params=["uncased", "cased"])
def any_tokenizer(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tok-{request.param}")
    corpus = root / "c.txt"
    corpus.write_text("\n\n".join(tricky_documents(200, seed=1)) + "\n")
    return train_tokenizer(
        [str(corpus)],
        root / "tok",
        vocab_size=150,
        lowercase=request.param == "uncased",
        show_progress=False,
    )


def direct_ids(tok, docs):
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def split_flat(encoded):
    ends = np.cumsum(encoded.lengths)
    return [encoded.ids[e - n : e].tolist() for e, n in zip(ends, encoded.lengths)]


@pytest.mark.parametrize("cache_chunks", [1 << 20, 50])
def test_chunk_cache_gives_the_tokenizers_ids(any_tokenizer, cache_chunks):
    tok = load_tokenizer(any_tokenizer)
    tok.encode_special_tokens = True
    docs = tricky_documents(300)
    encoder = BatchEncoder(tok, np.dtype(np.uint16), 0.1, cache_chunks=cache_chunks)
    assert encoder.cached  # the fast path is the one under test
    with sequential_tokenizers():
        got = [split_flat(encoder(docs[i : i + 40])) for i in range(0, len(docs), 40)]
    assert functools.reduce(operator.iadd, got, []) == direct_ids(tok, docs)
    assert len(encoder.chunks) <= max(cache_chunks, 40 * 41)  # emptied when full


def test_chunk_cache_on_real_text(shared_corpus, tmp_path):
    files = sorted(p for p in shared_corpus.rglob("*") if p.is_file())[:2]
    tok_dir = train_tokenizer(
        [str(p) for p in files], tmp_path / "tok", vocab_size=3000, show_progress=False
    )
    tok = load_tokenizer(tok_dir)
    tok.encode_special_tokens = True
    docs = list(iter_documents(files))
    encoder = BatchEncoder(tok, np.dtype(np.uint16), 0.01)
    with sequential_tokenizers():
        got = functools.reduce(
            operator.iadd,
            (split_flat(encoder(docs[i : i + 50])) for i in range(0, len(docs), 50)),
            [],
        )
    assert got == direct_ids(tok, docs)


def test_other_tokenizers_are_encoded_directly(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tok.encode_special_tokens = True
    tok.enable_truncation(5)  # a chunk's ids would no longer add up: no cache
    encoder = BatchEncoder(tok, np.dtype(np.uint16), 0.0)
    assert not encoder.cached
    docs = ["the small cat sees the dog near the river", "a b"]
    assert split_flat(encoder(docs)) == direct_ids(tok, docs)


def all_files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def without_timing(manifest):
    return {k: v for k, v in manifest.items() if k != "elapsed_s"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = [make_document(rng, rng.randint(1, 12)) for _ in range(150)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.mark.parametrize("boundary", ["cross", "new"])
def test_workers_do_not_change_the_output(corpus, tokenizer_dir, tmp_path, monkeypatch, boundary):
    monkeypatch.setattr(prepare_mod, "_BATCH_CHARS", 2000)  # many batches: the pool runs
    out = {}
    for workers in (1, 2):
        out[workers] = tmp_path / f"w{workers}"
        prepare(
            [str(corpus)],
            tokenizer_dir,
            out[workers],
            seq_len=32,
            valid_fraction=0.1,
            shard_sequences=40,
            show_progress=False,
            document_boundary=boundary,
            workers=workers,
        )
    one, two = all_files(out[1]), all_files(out[2])
    assert set(one) == set(two) and len(one) > 4  # several shards per split
    for name in one:
        if name == "manifest.json":
            assert without_timing(json.loads(one[name])) == without_timing(json.loads(two[name]))
        else:
            assert one[name] == two[name], name
    # the same as one batch in this process
    monkeypatch.setattr(prepare_mod, "_BATCH_CHARS", 10**9)
    prepare(
        [str(corpus)],
        tokenizer_dir,
        tmp_path / "whole",
        seq_len=32,
        valid_fraction=0.1,
        shard_sequences=40,
        show_progress=False,
        document_boundary=boundary,
    )
    whole = all_files(tmp_path / "whole")
    assert all(whole[n] == one[n] for n in one if n != "manifest.json")


_original_work = encode_mod._work


def _recording_work(docs):
    """encode._work that notes which process ran it (forked workers see this module)."""
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _original_work(docs)


def test_encode_batches_runs_on_worker_processes(tokenizer_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(tokenizer_dir)
    tok.encode_special_tokens = True
    monkeypatch.setattr(encode_mod, "_work", _recording_work)
    monkeypatch.setenv("PIDS_FILE", str(tmp_path / "pids"))
    batches = [
        ["the cat sees the dog"] * 3,
        ["a red bird"],
        ["the old king"] * 2,
        ["a river"] * 4,
        ["the city"],
    ]
    got = list(encode_mod.encode_batches(iter(batches), tok, np.dtype(np.uint16), 0.0, 3))
    assert [len(g.lengths) for g in got] == [3, 1, 2, 4, 1]  # in order
    assert [split_flat(g) for g in got] == [direct_ids(tok, b) for b in batches]
    pids = set((tmp_path / "pids").read_text().split())
    assert pids and str(os.getpid()) not in pids  # other processes did some of the work


def rows_of(data_dir, split="train"):
    maps = open_split(data_dir, split)
    return np.concatenate([np.asarray(m) for m in maps]) if maps else np.empty((0, 0))


def test_document_boundary_new(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(0)
    docs = [make_document(rng, n) for n in (1, 3, 7, 2, 12)]
    ids = direct_ids(tok, docs)
    body = 16 - 2
    # a document exactly one body long gets one unpadded sequence
    exact = next(
        " ".join(d.split()[:k])
        for d in docs
        for k in range(1, 40)
        if len(direct_ids(tok, [" ".join(d.split()[:k])])[0]) == body
    )
    docs.append(exact)
    ids.append(direct_ids(tok, [exact])[0])
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    manifest = prepare(
        [str(path)],
        tokenizer_dir,
        tmp_path / "d",
        seq_len=16,
        valid_fraction=0.0,
        show_progress=False,
        document_boundary="new",
    )
    assert manifest["document_boundary"] == "new"
    rows = rows_of(tmp_path / "d")
    assert len(rows) == sum(-(-len(x) // body) for x in ids)
    assert (rows[:, 0] == CLS).all()
    got, at = [], 0
    for x in ids:
        n = -(-len(x) // body)
        mine = rows[at : at + n]
        at += n
        assert (mine[:-1, -1] == SEP).all() and not (mine[:-1] == PAD).any()  # full rows
        last = mine[-1]
        fill = 1 + len(x) - (n - 1) * body  # [CLS] + the rest
        assert last[fill] == SEP and (last[fill + 1 :] == PAD).all()
        got.append(np.concatenate([mine[:-1, 1:-1].ravel(), last[1:fill]]).tolist())
    assert got == ids  # each document whole, in order, in its own sequences
    assert not (rows[-1] == PAD).any()  # the exact-length document: no padding


def test_padded_sequences_mask_and_train(tokenizer_dir, corpus, tmp_path, capsys):
    data = tmp_path / "new"
    prepare(
        [str(corpus)],
        tokenizer_dir,
        data,
        seq_len=32,
        valid_fraction=0.1,
        show_progress=False,
        document_boundary="new",
    )
    seqs = ShardedSequences(data, "train")
    rows = seqs.take(np.arange(len(seqs)))
    assert (rows == PAD).any()
    masker = Masker(
        vocab_size=200, special_ids=load_manifest(data)["special_token_ids"], mask_rate=0.5
    )
    batch = masker(rows, np.arange(len(rows)), 0, 0)
    assert batch.attention_mask is not None
    assert (batch.attention_mask.numpy() == (rows != PAD)).all()
    assert not (rows.reshape(-1)[batch.masked_positions.numpy()] == PAD).any()
    assert (batch.input_ids.numpy()[rows == PAD] == PAD).all()  # pads are never replaced

    run = tmp_path / "run"
    args = [
        "pretrain",
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--quiet",
    ]
    code, _, err = run_cli(capsys, *args)  # the run says cross, the data new: refused
    assert code == 2 and "document_boundary" in err and len(err.strip().splitlines()) == 1
    code, _out, err = run_cli(capsys, *args, "--document-boundary", "new")
    assert code == 0, err
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_parts_split_the_corpus(corpus, tokenizer_dir, tmp_path, capsys):
    kwargs = dict(seq_len=32, valid_fraction=0.0, show_progress=False, document_boundary="new")
    whole = prepare([str(corpus)], tokenizer_dir, tmp_path / "whole", **kwargs)
    parts = [
        prepare(
            [str(corpus)], tokenizer_dir, tmp_path / f"p{i}", num_shards=3, shard_index=i, **kwargs
        )
        for i in range(3)
    ]
    docs = [p["splits"]["train"]["documents"] for p in parts]
    assert sum(docs) == whole["splits"]["train"]["documents"] and max(docs) - min(docs) <= 1
    assert [p["part"] for p in parts] == [{"index": i, "count": 3} for i in range(3)]
    # with each document in its own sequences, the parts' rows are the whole's rows
    union = np.concatenate([rows_of(tmp_path / f"p{i}") for i in range(3)])
    expect = rows_of(tmp_path / "whole")
    assert sorted(map(bytes, union)) == sorted(map(bytes, expect))
    # part 1 is every third document, from the second
    texts = list(iter_documents([corpus]))
    tok = load_tokenizer(tokenizer_dir)
    n = sum(len(x) for x in direct_ids(tok, texts[1::3]))
    assert parts[1]["splits"]["train"]["tokens"] == n

    code, _, err = run_cli(
        capsys,
        "prepare",
        corpus,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "bad",
        "--num-shards",
        "3",
        "--shard-index",
        "3",
    )
    assert code == 2 and "shard" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(
        capsys,
        "prepare",
        corpus,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "bad",
        "--workers",
        "0",
    )
    assert code == 2 and "workers" in err


@pytest.fixture(scope="module")
def parts(corpus, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    for i in range(2):
        code = run_cli_plain(
            "prepare",
            corpus,
            "--tokenizer",
            tokenizer_dir,
            "--out",
            root / f"p{i}",
            "--seq-len",
            "32",
            "--valid-fraction",
            "0.1",
            "--num-shards",
            "2",
            "--shard-index",
            str(i),
            "--quiet",
        )
        assert code == 0
    return [root / "p0", root / "p1"]


def run_cli_plain(*argv) -> int:
    from bertforge.cli.main import main

    return main([str(a) for a in argv])


def test_several_data_dirs_read_as_one(parts, tokenizer_dir, corpus, tmp_path):
    both = ShardedSequences(parts, "train")
    singles = [ShardedSequences(p, "train") for p in parts]
    assert len(both) == sum(len(s) for s in singles)
    expect = np.concatenate([s.take(np.arange(len(s))) for s in singles])
    assert (both.take(np.arange(len(both))) == expect).all()

    prepare([str(corpus)], tokenizer_dir, tmp_path / "other", seq_len=64, show_progress=False)
    with pytest.raises(BertforgeError, match="seq_len 64"):
        ShardedSequences([parts[0], tmp_path / "other"], "train")
    other_tok = train_tokenizer(
        [str(corpus)], tmp_path / "tok2", vocab_size=120, show_progress=False
    )
    prepare([str(corpus)], other_tok, tmp_path / "other2", seq_len=32, show_progress=False)
    with pytest.raises(BertforgeError, match="tokenizer_hash"):
        ShardedSequences([parts[0], tmp_path / "other2"], "train")
    with pytest.raises(BertforgeError, match="given twice"):
        ShardedSequences([parts[0], parts[0]], "train")


def test_pretrain_and_evaluate_on_several_dirs(parts, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--data",
        parts[0],
        "--data",
        parts[1],
        "--out",
        run,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--schedule",
        "constant",
        "--warmup-steps",
        "1",
        "--quiet",
    ]
    code, out, err = run_cli(capsys, *args, "--max-steps", "2")
    assert code == 0, err
    import yaml

    path = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
    assert path == [str(p.resolve()) for p in parts]
    code, out, err = run_cli(capsys, *args, "--max-steps", "3", "--resume")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["step"] == 3
    code, out, err = run_cli(capsys, "evaluate", run)  # the run's list of directories
    assert code == 0, err
    first = json.loads(out)
    code, out, err = run_cli(capsys, "evaluate", run, "--data", parts[0], "--data", parts[1])
    assert code == 0 and json.loads(out) == first


def test_a_batch_draws_from_several_shards(tokenizer_dir, corpus, tmp_path):
    prepare(
        [str(corpus)],
        tokenizer_dir,
        tmp_path / "d",
        seq_len=16,
        valid_fraction=0.0,
        shard_sequences=10,
        show_progress=False,
    )
    seqs = ShardedSequences(tmp_path / "d", "train")
    assert len(seqs.shards) >= 5
    masker = Masker(vocab_size=200, special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    batches = PretrainBatches(seqs, masker, batch_size=16, micro_batch_size=8, seed=0)
    index, _ = batches.global_indices(0)
    shard_of = np.searchsorted(seqs.offsets, index, side="right") - 1
    assert len(set(shard_of.tolist())) >= 3
    again = PretrainBatches(seqs, masker, batch_size=16, micro_batch_size=8, seed=0)
    assert (again.global_indices(0)[0] == index).all()  # a pure function of (seed, step)
    other = PretrainBatches(seqs, masker, batch_size=16, micro_batch_size=8, seed=1)
    assert not (other.global_indices(0)[0] == index).all()
