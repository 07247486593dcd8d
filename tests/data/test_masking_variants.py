"""Whole-word and span masking: rates, 80/10/10 per unit, word and span structure,
determinism per sequence, the held-out masker, and short pretraining runs of each.

The data is built here with a deliberately small WordPiece vocabulary, so most words
split into several "##" pieces, and documents of 1 to 40 sentences, so packed
sequences hold [SEP] boundaries as well as long runs of text.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_document, run_cli

from bertforge.config import DataConfig, RunConfig
from bertforge.data.loader import ShardedSequences
from bertforge.data.masking import Masker, build_masker, span_lengths
from bertforge.data.tokenizer import load_tokenizer, train_tokenizer
from bertforge.errors import BertforgeError

P, MAX = 0.2, 10
# SpanBERT's truncated geometric: E[L] = sum l p q^(l-1) / sum p q^(l-1), l = 1..10 (3.80).
PMF = np.array([P * (1 - P) ** (n - 1) for n in range(1, MAX + 1)])
PMF /= PMF.sum()
EXPECTED_SPAN = float((np.arange(1, MAX + 1) * PMF).sum())


@pytest.fixture(scope="module")
def pieces_data(tmp_path_factory) -> Path:
    """Prepared data (seq_len 128, ~2,700 sequences) whose words split into pieces."""
    root = tmp_path_factory.mktemp("pieces")
    rng = random.Random(5)
    docs = [make_document(rng, sentences=rng.randint(1, 40)) for _ in range(800)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=90, show_progress=False)
    from bertforge.data.prepare import prepare

    prepare(
        [str(corpus)],
        root / "tok",
        root / "data",
        seq_len=128,
        valid_fraction=0.05,
        show_progress=False,
    )
    return root / "data"


@pytest.fixture(scope="module")
def rows(pieces_data) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, 128), index (N,)): every training sequence, the last one padded."""
    seqs = ShardedSequences(pieces_data, "train")
    index = np.arange(len(seqs), dtype=np.int64)
    tokens = seqs.take(index)
    assert len(seqs) > 2000 and (tokens == 0).any()  # the padded last sequence is there
    return tokens, index


def masker(data: Path, masking: str, **kw) -> Masker:
    return build_masker(DataConfig(masking=masking, **kw), data)


def word_ids(data: Path, tokens: np.ndarray) -> np.ndarray:
    """(B, T) the word each maskable piece belongs to, -1 on specials: computed from the
    vocabulary strings, independently of the masker's own table."""
    vocab = load_tokenizer(data / "tokenizer").get_vocab()
    names = np.array(sorted(vocab, key=vocab.get), dtype=object)
    cont = np.vectorize(lambda s: s.startswith("##"))(names[tokens])
    special = tokens <= 4
    out = np.full(tokens.shape, -1, dtype=np.int64)
    word = -1
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            if special[b, i]:
                continue
            if not (cont[b, i] and i > 0 and not special[b, i - 1]):
                word += 1
            out[b, i] = word
    return out


def special_mask(tokens: np.ndarray) -> np.ndarray:
    return np.isin(tokens, [0, 2, 3])  # [PAD], [CLS], [SEP]


def test_small_vocab_splits_words(pieces_data, rows):
    table = masker(pieces_data, "wwm").is_continuation
    vocab = load_tokenizer(pieces_data / "tokenizer").get_vocab()
    assert table.shape == (len(vocab),)
    assert all(table[i] == t.startswith("##") for t, i in vocab.items())
    tokens, _ = rows
    assert table[tokens].mean() > 0.3  # many words are several pieces: the tests bite


@pytest.mark.parametrize("masking", ["token", "wwm", "span"])
@pytest.mark.parametrize("rate", [0.15, 0.40])
def test_achieved_rate_and_no_specials(pieces_data, rows, masking, rate):
    tokens, index = rows
    out = masker(pieces_data, masking, mask_rate=rate)(tokens, index, 0, 0)
    flat = tokens.reshape(-1)
    chosen = flat[out.masked_positions.numpy()]
    assert not special_mask(chosen).any()
    achieved = len(chosen) / (~special_mask(tokens)).sum()
    # span: the word that reaches a sequence's budget is masked whole (< 1 word over).
    assert abs(achieved - rate) < (0.01 if masking != "span" else 0.015), achieved
    keep = np.ones(flat.size, bool)
    keep[out.masked_positions.numpy()] = False
    np.testing.assert_array_equal(out.input_ids.reshape(-1).numpy()[keep], flat[keep])


@pytest.mark.parametrize("masking", ["wwm", "span"])
@pytest.mark.parametrize("ratios", [(0.8, 0.1), (0.5, 0.3)])
def test_replacement_ratios_per_unit(pieces_data, rows, masking, ratios):
    tokens, index = rows
    m = masker(
        pieces_data,
        masking,
        mask_rate=0.4,
        mask_token_ratio=ratios[0],
        random_token_ratio=ratios[1],
    )
    out = m(tokens, index, 3, 1)
    selected, unit = m.select(tokens, index, 3, 1)
    pos = out.masked_positions.numpy()
    np.testing.assert_array_equal(np.flatnonzero(selected), pos)
    inputs, targets = out.input_ids.reshape(-1).numpy()[pos], out.targets.numpy()
    is_mask = inputs == 4
    changed = ~is_mask & (inputs != targets)
    assert not np.isin(inputs[changed], [0, 1, 2, 3, 4]).any()  # random ids are ordinary
    # Per unit (word or span) one decision: its pieces are all [MASK] or none is.
    units, first = np.unique(unit[pos], return_inverse=True)
    per_unit_mask = np.bincount(first, weights=is_mask) / np.bincount(first)
    assert set(np.unique(per_unit_mask)) <= {0.0, 1.0}
    assert len(units) > 5000
    unit_mask = per_unit_mask == 1
    unit_changed = np.bincount(first, weights=changed) > 0  # a random piece may equal its target
    assert abs(unit_mask.mean() - ratios[0]) < 0.02
    assert abs(unit_changed.mean() - ratios[1]) < 0.02
    assert abs(1 - unit_mask.mean() - unit_changed.mean() - (1 - sum(ratios))) < 0.02


def test_wwm_selects_whole_words(pieces_data, rows):
    tokens, index = rows
    tokens, index = tokens[:600], index[:600]
    words = word_ids(pieces_data, tokens)
    out = masker(pieces_data, "wwm", mask_rate=0.3)(tokens, index, 0, 0)
    selected = np.zeros(tokens.size, bool)
    selected[out.masked_positions.numpy()] = True
    w = words.reshape(-1)
    ok = w >= 0
    per_word = np.bincount(w[ok], weights=selected[ok])
    size = np.bincount(w[ok])
    assert ((per_word == 0) | (per_word == size)).all()  # all pieces or none
    assert (per_word[size > 1] > 0).sum() > 500  # multi-piece words were chosen
    assert abs((per_word > 0).mean() - 0.3) < 0.02  # the rate holds per word too


def test_span_length_distribution():
    u = np.random.default_rng(0).random(200_000)
    lengths = span_lengths(u, P, MAX)
    assert lengths.min() == 1 and lengths.max() == MAX
    assert abs(EXPECTED_SPAN - 3.797) < 1e-3
    assert abs(lengths.mean() - EXPECTED_SPAN) < 0.03
    np.testing.assert_allclose(
        np.bincount(lengths, minlength=MAX + 1)[1:] / len(u), PMF, atol=0.004
    )
    assert (span_lengths(u[:100], 1.0, MAX) == 1).all()
    assert span_lengths(u, 0.5, 3).max() == 3


def spans_of(m: Masker, tokens: np.ndarray, index: np.ndarray, words: np.ndarray):
    """[(positions, words spanned)] of every span in the batch."""
    _, unit = m.select(tokens, index, 0, 0)
    pos = np.flatnonzero(unit >= 0)
    order = np.argsort(unit[pos], kind="stable")
    pos = pos[order]
    groups = np.split(pos, np.flatnonzero(np.diff(unit[pos])) + 1)
    w = words.reshape(-1)
    return [(g, len(np.unique(w[g]))) for g in groups]


@pytest.mark.parametrize("rate", [0.15, 0.40])
def test_spans_whole_words_contiguous_never_cross_specials(pieces_data, rows, rate):
    tokens, index = rows
    tokens, index = tokens[-800:], index[-800:]  # includes the padded last sequence
    words = word_ids(pieces_data, tokens)
    m = masker(pieces_data, "span", mask_rate=rate)
    spans = spans_of(m, tokens, index, words)
    flat, t = tokens.reshape(-1), tokens.shape[1]
    w = words.reshape(-1)
    size = np.bincount(w[w >= 0])
    at_boundary = 0  # spans that end right before a [SEP] inside the sequence
    for g, n_words in spans:
        assert (np.diff(g) == 1).all() and g[0] // t == g[-1] // t  # contiguous, one row
        assert not special_mask(flat[g]).any()  # so no [SEP]/[CLS]/[PAD] inside
        assert g[0] == 0 or w[g[0] - 1] != w[g[0]]  # starts at a word start
        covered = np.unique(w[g])
        assert (np.bincount(w[g], minlength=len(size))[covered] == size[covered]).all()
        assert 1 <= n_words <= MAX
        after = g[-1] + 1  # in the same row: the row's last position is always [SEP]/[PAD]
        at_boundary += bool(flat[after] == 3 and after % t != t - 1)
    assert at_boundary > 20  # spans do run up to [SEP] between documents, and stop there


def test_span_mean_length_close_to_expectation():
    # Long rows of one-piece words, 2% masked: spans are rarely cut short by the budget,
    # a neighbour span or [SEP], so they show the lengths drawn.
    tokens = np.random.default_rng(0).integers(5, 1000, size=(64, 4096))
    tokens[:, 0], tokens[:, -1] = 2, 3
    m = Masker(
        1000,
        {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        mask_rate=0.02,
        masking="span",
        is_continuation=np.zeros(1000, bool),
    )
    spans = spans_of(m, tokens, np.arange(64), np.arange(tokens.size).reshape(tokens.shape))
    lengths = np.array([n for _, n in spans])
    assert len(lengths) > 1000 and lengths.max() == MAX
    assert 0.93 * EXPECTED_SPAN < lengths.mean() < EXPECTED_SPAN + 0.15, lengths.mean()


def test_span_mean_length_on_wordpiece_data(pieces_data, rows):
    tokens, index = rows
    words = word_ids(pieces_data, tokens[:1500])
    spans = spans_of(masker(pieces_data, "span"), tokens[:1500], index[:1500], words)
    mean = float(np.mean([n for _, n in spans]))
    # 128-token rows of ~2-piece words hold a budget of ~10 words: the budget, [SEP] and
    # neighbour spans cut spans short (never longer than drawn).
    assert 0.7 * EXPECTED_SPAN < mean < EXPECTED_SPAN, mean
    # whole-word masking leaves single-word units only
    wwm = spans_of(masker(pieces_data, "wwm"), tokens[:1500], index[:1500], words)
    assert all(n == 1 for _, n in wwm)


@pytest.mark.parametrize("masking", ["token", "wwm", "span"])
def test_mask_depends_only_on_seed_epoch_index(pieces_data, rows, masking):
    tokens, index = rows[0][:64], rows[1][:64] + 1000
    m = masker(pieces_data, masking, mask_rate=0.3)
    epochs = np.arange(64) % 3
    whole = m(tokens, index, 7, epochs)
    order = np.random.default_rng(0).permutation(64)[:20]  # other rows, other order
    part = m(tokens[order], index[order], 7, epochs[order])
    np.testing.assert_array_equal(whole.input_ids.numpy()[order], part.input_ids.numpy())
    for again in (
        m(tokens, index, 7, epochs),
        build_masker(DataConfig(masking=masking, mask_rate=0.3), pieces_data)(
            tokens, index, 7, epochs
        ),
    ):
        np.testing.assert_array_equal(whole.input_ids.numpy(), again.input_ids.numpy())
    assert not np.array_equal(whole.input_ids.numpy(), m(tokens, index, 7, epochs + 1).input_ids)
    assert not np.array_equal(whole.input_ids.numpy(), m(tokens, index, 8, epochs).input_ids)


def test_build_masker_eval_is_token_masking(pieces_data, tmp_path):
    cfg = DataConfig(
        masking="span",
        mask_rate=0.3,
        mask_token_ratio=0.6,
        random_token_ratio=0.2,
        span_p=0.5,
        span_max=4,
    )
    train = build_masker(cfg, pieces_data)
    held_out = build_masker(cfg, pieces_data, for_eval=True)
    assert (train.masking, train.span_p, train.span_max) == ("span", 0.5, 4)
    assert held_out.masking == "token" and held_out.is_continuation is None
    assert (held_out.mask_rate, held_out.mask_token_ratio, held_out.random_token_ratio) == (
        0.3,
        0.6,
        0.2,
    )
    lone = tmp_path / "data"  # a data directory without its tokenizer copy
    lone.mkdir()
    (lone / "manifest.json").write_text((pieces_data / "manifest.json").read_text())
    with pytest.raises(BertforgeError, match="tokenizer"):
        build_masker(cfg, lone)
    assert build_masker(cfg, lone, for_eval=True).masking == "token"  # needs no tokenizer
    with pytest.raises(BertforgeError, match="masking"):
        Masker(90, {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, masking="wwm")


def pretrain(capsys, data: Path, out: Path, masking: str) -> dict:
    code, stdout, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data,
        "--out",
        out,
        "--preset",
        "tiny",
        "--hidden-size",
        64,
        "--num-attention-heads",
        2,
        "--intermediate-size",
        128,
        "--max-position-embeddings",
        128,
        "--seq-len",
        128,
        "--max-steps",
        4,
        "--batch-size",
        8,
        "--micro-batch-size",
        4,
        "--eval-sequences",
        32,
        "--log-every",
        1,
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--masking",
        masking,
        "--mask-rate",
        0.3,
        "--span-max",
        5,
        "--quiet",
    )
    assert code == 0, err
    return json.loads(stdout.strip().splitlines()[-1])


def test_pretrain_with_wwm_and_span(capsys, pieces_data, tmp_path):
    evals = {}
    for masking in ("wwm", "span"):
        run = tmp_path / masking
        result = pretrain(capsys, pieces_data, run, masking)
        saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
        assert (saved["masking"], saved["mask_rate"], saved["span_max"]) == (masking, 0.3, 5)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train = [x["loss"] for x in lines if x["kind"] == "train"]
        assert len(train) == 4 and all(math.isfinite(x) for x in train)
        assert math.isfinite(result["mlm_loss"])
        evals[masking] = result["masked_tokens"]
        code, stdout, _ = run_cli(capsys, "evaluate", run, "--max-sequences", 32)
        assert code == 0 and json.loads(stdout)["masked_tokens"] == result["masked_tokens"]
    # Held-out scoring is token masking at the run's rate for both: the same masked tokens.
    assert evals["wwm"] == evals["span"]
    task_cfg = RunConfig.load(tmp_path / "span" / "config.yaml")
    from bertforge.tasks.mlm import MLMTask

    task = MLMTask(task_cfg, pieces_data, device=torch.device("cpu"))
    assert task.masker.masking == "span" and task.eval_masker.masking == "token"
