"""NSP and SOP: pair construction, the two-term loss, held-out pair metrics, HF export.

Pair tests run on synthetic packed sequences whose every token id is unique, so a token
tells which document and which sequence it came from, and contiguity is exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_run_config

from bertforge.commands.pretrain import run_pretrain
from bertforge.config import RunConfig
from bertforge.data.loader import ShardedSequences
from bertforge.data.masking import Masker
from bertforge.data.pairs import IGNORE, PairBuilder, PairedMasker, pair_kind
from bertforge.tasks.mlm import MLMTask

SPECIAL = dict(pad=0, unk=1, cls=2, sep=3, mask=4)
FIRST_ID = 10


class Rows:
    """An in-memory stand-in for ShardedSequences."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray) -> np.ndarray:
        return self.rows[index].astype(np.int64)


def packed(n_docs: int = 400, seq_len: int = 32, seed: int = 0):
    """Documents of 5-120 unique tokens joined by [SEP] and cut into [CLS] body [SEP] rows,
    as `prepare` packs them (no body starts with the joining [SEP]). Returns (rows,
    doc_of, row_of): the document and the row each token id lies in."""
    rng = np.random.default_rng(seed)
    stream, doc_of, next_id = [], {}, FIRST_ID
    for d in range(n_docs):
        length = int(rng.integers(5, 121))
        if stream:
            stream.append(SPECIAL["sep"])
        for _ in range(length):
            stream.append(next_id)
            doc_of[next_id] = d
            next_id += 1
    body = seq_len - 2
    rows, pos = [], 0
    while True:
        if pos < len(stream) and stream[pos] == SPECIAL["sep"]:
            pos += 1
        if len(stream) - pos < body:
            break
        rows.append([SPECIAL["cls"], *stream[pos : pos + body], SPECIAL["sep"]])
        pos += body
    rows = np.array(rows, dtype=np.int64)
    row_of = {int(t): r for r, row in enumerate(rows) for t in row if t >= FIRST_ID}
    return rows, doc_of, row_of


def split(tokens: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one assembled pair, read through its token types."""
    real = tokens >= FIRST_ID
    return tokens[real & (types == 0)], tokens[real & (types == 1)]


def contiguous(ids: np.ndarray) -> bool:
    """Unique ids are consecutive exactly when they are consecutive stream tokens of one
    document (a [SEP] between documents takes no id, but the next document's ids follow
    on, so the one-document check is separate)."""
    return len(ids) > 0 and bool(np.all(np.diff(ids) == 1))


def build(kind: str, rows: np.ndarray, seed: int = 0, epoch: int = 0, index=None):
    index = np.arange(len(rows)) if index is None else np.asarray(index)
    return PairBuilder(Rows(rows), SPECIAL, kind)(rows[index], index, seed, epoch)


# ---------------------------------------------------------------------------- pairs


def test_pair_kind():
    assert pair_kind("mlm") is None
    assert pair_kind("mlm+nsp") == "nsp" and pair_kind("mlm+sop") == "sop"


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_labels_are_balanced(kind):
    rows, _, _ = packed(n_docs=1200)
    labels = build(kind, rows).labels
    kept = labels[labels != IGNORE]
    assert len(rows) > 2000 and len(kept) > 0.98 * len(labels)
    assert 0.46 < kept.mean() < 0.54, kept.mean()


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_in_order_pairs_are_contiguous_text_of_one_document(kind):
    rows, doc_of, row_of = packed()
    p = build(kind, rows)
    seen = 0
    for r in np.flatnonzero(p.labels == 0):
        a, b = split(p.tokens[r], p.token_type_ids[r])
        assert len(a) >= 1 and len(b) >= 1
        both = np.concatenate([a, b])
        assert contiguous(both), (a, b)
        assert {doc_of[int(t)] for t in both} == {doc_of[int(both[0])]}
        assert {row_of[int(t)] for t in both} == {r}  # from the sequence itself
        # The longest document piece of the row, cut to the room a pair has (T - 3).
        pieces = np.split(rows[r, 1:-1], np.flatnonzero(rows[r, 1:-1] == SPECIAL["sep"]))
        longest = max(len(x[x >= FIRST_ID]) for x in pieces)
        assert len(both) == min(longest, rows.shape[1] - 3)
        seen += 1
    assert seen > 100


def test_nsp_not_next_segment_comes_from_another_sequence():
    rows, doc_of, row_of = packed()
    p = build("nsp", rows)
    other_doc = same_length = 0
    not_next = np.flatnonzero(p.labels == 1)
    for r in not_next:
        a, b = split(p.tokens[r], p.token_type_ids[r])
        assert contiguous(a) and {row_of[int(t)] for t in a} == {r}
        assert contiguous(b)  # one window of one document ...
        assert len({doc_of[int(t)] for t in b}) == 1
        (j,) = {row_of[int(t)] for t in b}
        assert j != r and abs(j - r) > 1  # ... of another sequence, not a neighbour
        other_doc += doc_of[int(b[0])] != doc_of[int(a[0])]
        # B has the true B's length (A + B fill what the IsNext pair would have), unless
        # none of the sequences tried had a piece that long: then it is shorter.
        pieces = np.split(rows[r, 1:-1], np.flatnonzero(rows[r, 1:-1] == SPECIAL["sep"]))
        room = min(max(len(x[x >= FIRST_ID]) for x in pieces), rows.shape[1] - 3)
        assert len(a) + len(b) <= room
        same_length += len(a) + len(b) == room
    assert len(not_next) > 100
    assert other_doc / len(not_next) > 0.95
    assert same_length / len(not_next) > 0.95


def test_sop_swapped_pairs_are_reversed():
    rows, _doc_of, row_of = packed()
    p = build("sop", rows)
    swapped = np.flatnonzero(p.labels == 1)
    for r in swapped:
        a, b = split(p.tokens[r], p.token_type_ids[r])
        assert contiguous(np.concatenate([b, a])) and not contiguous(np.concatenate([a, b]))
        assert {row_of[int(t)] for t in np.concatenate([a, b])} == {r}
    assert len(swapped) > 100


def hand_made(kind: str, row: list[int], want_label: int, seq_len: int = 10):
    """The first of indices 0..99 whose pair gets `want_label`: (pair tokens, types, batch)."""
    rows = np.array([row + [SPECIAL["pad"]] * (seq_len - len(row))] * 100, dtype=np.int64)
    masker = PairedMasker(
        Masker(vocab_size=100, special_ids=SPECIAL, mask_rate=1e-9),
        PairBuilder(Rows(rows), SPECIAL, kind),
    )
    for i in range(100):
        batch = masker(rows[i : i + 1], np.array([i]), 0, 0)
        if batch.next_sentence_label.item() == want_label:
            return batch
    raise AssertionError(f"no row got label {want_label}")


def test_hand_made_sequence_exact():
    # Three documents' pieces: [10], [20 21], [30]; only [20 21] can be split.
    row = [2, 10, 3, 20, 21, 3, 30, 3]
    in_order = hand_made("sop", row, 0)
    assert in_order.input_ids.tolist() == [[2, 20, 3, 21, 3, 0, 0, 0, 0, 0]]
    assert in_order.token_type_ids.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    assert in_order.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    swapped = hand_made("sop", row, 1)
    assert swapped.input_ids.tolist() == [[2, 21, 3, 20, 3, 0, 0, 0, 0, 0]]
    assert swapped.token_type_ids.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    assert swapped.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    # A full-length piece loses its last token: [CLS] A [SEP] B [SEP] has T - 3 slots.
    full = hand_made("sop", [2, 11, 12, 13, 14, 15, 16, 17, 18, 3], 0)
    ids, types = full.input_ids[0].tolist(), full.token_type_ids[0].tolist()
    cut = ids.index(3)
    assert ids == [2, *range(11, 10 + cut), 3, *range(10 + cut, 18), 3]
    assert types == [0] * (cut + 1) + [1] * (9 - cut)
    assert full.attention_mask is None  # no padding: SDPA stays mask-free
    # A row whose pieces are all shorter than 2 tokens yields no pair, and is ignored.
    lone = hand_made("nsp", [2, 10, 3, 11, 3], IGNORE)
    assert lone.input_ids.tolist() == [[2, 10, 3, 0, 0, 0, 0, 0, 0, 0]]
    assert lone.token_type_ids.tolist() == [[0] * 10]


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_pairs_are_deterministic_per_seed_epoch_and_index(kind):
    rows, _, _ = packed()
    first = build(kind, rows, index=[5, 9, 17, 40])
    again = build(kind, rows, index=[40, 17, 3])  # other company, other order
    for r_first, r_again in ((3, 0), (2, 1)):
        assert np.array_equal(first.tokens[r_first], again.tokens[r_again])
        assert np.array_equal(first.token_type_ids[r_first], again.token_type_ids[r_again])
        assert first.labels[r_first] == again.labels[r_again]
    everything = build(kind, rows)
    later, reseeded = build(kind, rows, epoch=1), build(kind, rows, seed=1)
    assert np.array_equal(everything.tokens, build(kind, rows).tokens)
    for other in (later, reseeded):
        assert (other.labels != everything.labels).mean() > 0.3
        assert (other.tokens != everything.tokens).any(axis=1).mean() > 0.5


def test_masking_keeps_the_pair_structure():
    rows, _, _ = packed()
    index = np.arange(64)
    masker = Masker(vocab_size=FIRST_ID + 10_000, special_ids=SPECIAL, mask_rate=0.5)
    builder = PairBuilder(Rows(rows), SPECIAL, "nsp")
    pairs = builder(rows[index], index, 0, 0)
    batch = PairedMasker(masker, builder)(rows[index], index, 0, 0)
    special = np.isin(pairs.tokens, [SPECIAL["cls"], SPECIAL["sep"], SPECIAL["pad"]])
    assert not special.reshape(-1)[batch.masked_positions.numpy()].any()
    assert np.array_equal(batch.input_ids.numpy()[special], pairs.tokens[special])
    assert np.array_equal(
        batch.targets.numpy(), pairs.tokens.reshape(-1)[batch.masked_positions.numpy()]
    )
    assert np.array_equal(batch.token_type_ids.numpy(), pairs.token_type_ids)
    assert np.array_equal(batch.next_sentence_label.numpy(), pairs.labels)


# ---------------------------------------------------------------------------- training


def tiny_config(objective: str, **train) -> RunConfig:
    return tiny_run_config(objective, **{"max_steps": 3, "eval_every": 0, **train})


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop"])
def test_task_has_two_loss_terms_each_with_its_count(objective, data_dir):
    kind = pair_kind(objective)
    cfg = tiny_config(objective)
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    batch = task.batch(0)
    (micro,), count = batch.micro, batch.counts
    labels = micro.next_sentence_label
    assert count == {"mlm": micro.targets.numel(), kind: int((labels != IGNORE).sum())}
    assert count[kind] >= 12 and micro.token_type_ids is not None
    torch.manual_seed(0)
    from bertforge.model.bert import BertForPreTraining

    model = BertForPreTraining(cfg.model)
    sums, extra = task.loss_sum(model, micro)
    mlm_logits, pair_logits = model(
        micro.input_ids, micro.token_type_ids, micro.attention_mask, micro.masked_positions
    )
    kept = labels != IGNORE
    torch.testing.assert_close(
        sums[kind], F.cross_entropy(pair_logits[kept], labels[kept], reduction="sum")
    )
    torch.testing.assert_close(
        sums["mlm"], F.cross_entropy(mlm_logits, micro.targets, reduction="sum")
    )
    assert extra[f"{kind}_accuracy"] == (pair_logits.argmax(-1) == labels).sum()
    assert set(extra) == {"mlm_accuracy", f"{kind}_accuracy"}
    # Held-out pairs are built with a fixed seed: the same metrics on every call.
    first, second = task.evaluate(model.eval(), 0), task.evaluate(model, 0)
    assert first == second and 0 < first[f"{kind}_pairs"] and f"{kind}_loss" in first


def test_nsp_losses_do_not_depend_on_micro_batch_size(tmp_path, data_dir):
    def train_losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(x["loss"], x["mlm_loss"], x["nsp_loss"]) for x in lines if x["kind"] == "train"]

    run_pretrain(
        tmp_path / "a",
        tiny_config("mlm+nsp", micro_batch_size=16),
        data_dir=data_dir,
        show_progress=False,
    )
    run_pretrain(
        tmp_path / "b",
        tiny_config("mlm+nsp", micro_batch_size=4),
        data_dir=data_dir,
        show_progress=False,
    )
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == 3
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    for total, mlm, nsp in a:
        assert total == pytest.approx(mlm + nsp)


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop", "mlm"])
def test_pretrain_objective_end_to_end(objective, tmp_path, data_dir, capsys):
    """metrics.jsonl and `evaluate` report the pair head; the export loads in
    transformers.BertForPreTraining with bertforge's seq_relationship logits."""
    transformers = pytest.importorskip("transformers")
    from bertforge.commands.loading import load_run_model

    kind = pair_kind(objective)
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        data_dir,
        "--out",
        run,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "4",
        "--batch-size",
        "16",
        "--micro-batch-size",
        "8",
        "--lr",
        "5e-3",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--objective",
        objective,
        "--quiet",
    )
    assert code == 0, err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert len(train) == 4 and [e["step"] for e in evals] == [2, 4]
    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 0, err
    result = json.loads(out)
    assert "mlm_loss" in result and "mlm_loss" in evals[-1]
    if kind is None:
        assert not any(k.startswith(("nsp", "sop")) for x in [*lines, result] for k in x)
        return
    for x in train:
        assert 0 < x[f"{kind}_loss"] < 2 and 0 <= x[f"{kind}_accuracy"] <= 1
        assert x["loss"] == pytest.approx(x["mlm_loss"] + x[f"{kind}_loss"])
    for x in [*evals, result]:
        assert 0 < x[f"{kind}_loss"] < 2 and 0 <= x[f"{kind}_accuracy"] <= 1
    assert result[f"{kind}_loss"] == pytest.approx(evals[-1][f"{kind}_loss"], abs=1e-4)

    model, cfg, _ = load_run_model(run)
    torch.manual_seed(cfg.train.seed)
    from bertforge.model.bert import BertForPreTraining

    initial = BertForPreTraining(cfg.model).seq_relationship.weight
    assert not torch.allclose(model.seq_relationship.weight, initial)  # the head trained
    hf = transformers.BertForPreTraining.from_pretrained(run / "hf").eval()
    torch.testing.assert_close(
        hf.cls.seq_relationship.weight.detach(), model.seq_relationship.weight.detach()
    )
    sequences = ShardedSequences(data_dir, "train")
    specials = sequences.manifest["special_token_ids"]
    index = np.arange(16)
    p = PairBuilder(sequences, specials, kind)(sequences.take(index), index, 0, 0)
    ids, types = torch.from_numpy(p.tokens), torch.from_numpy(p.token_type_ids)
    mask = (ids != specials["pad"]).long()
    assert (mask == 0).any() and (types == 1).any()
    with torch.no_grad():
        ours = model(ids, types, mask)[1]
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(theirs.seq_relationship_logits, ours, atol=1e-4, rtol=0)
