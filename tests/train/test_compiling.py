"""torch.compile: the training forward and loss trace as one graph on both kernel paths,
and a run's changing batch shapes do not recompile it.

Dynamo alone (torch._dynamo.explain, the "eager" backend) answers both questions in
seconds; Inductor's code generation is exercised by the compiled runs of
commands/test_pretrain.py
(losses equal to eager, exact resume, micro-batch independence).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_run_config

from bertforge.config import TrainConfig
from bertforge.data.masking import MaskedBatch
from bertforge.model import ops
from bertforge.model.bert import BertForSequenceClassification
from bertforge.tasks.classification import Batch
from bertforge.tasks.mlm import MLMTask, mlm_loss_sum, pretraining_model
from bertforge.train.compiling import CompileCounters, compile_loss

DEVICE = torch.device("cpu")


def _padded(micro: MaskedBatch, lengths: list[int]) -> MaskedBatch:
    """`micro` with rows cut to `lengths` (padding after them), masks only on real tokens."""
    _B, T = micro.input_ids.shape
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    keep = mask.view(-1)[micro.masked_positions].bool()
    return MaskedBatch(
        micro.input_ids * mask,
        micro.masked_positions[keep],
        micro.targets[keep],
        mask,
        micro.token_type_ids,
        micro.next_sentence_label,
    )


def _classification_loss(model, micro: Batch):
    """As ClassificationTask.loss_sum computes it (cross-entropy and hits)."""
    logits = model(micro.input_ids, micro.token_type_ids, micro.attention_mask)  # (B, C)
    loss = torch.nn.functional.cross_entropy(logits.float(), micro.y, reduction="sum")
    return {"examples": loss}, {"accuracy": (logits.detach().argmax(-1) == micro.y).sum()}


def _classification_batch(rng: random.Random, B: int, T: int, padded: bool) -> Batch:
    ids = torch.randint(5, 200, (B, T), generator=torch.Generator().manual_seed(T))
    mask = None
    if padded:
        lengths = torch.tensor([rng.randint(2, T) for _ in range(B - 1)] + [T])
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return Batch(ids, torch.zeros_like(ids), mask, torch.randint(0, 2, (B,)))


def _cases(data_dir):
    """(name, model, loss function, micro-batch) for every kind of training forward."""
    cases = []
    for objective in ("mlm", "mlm+nsp"):
        cfg = tiny_run_config(objective, batch_size=8, micro_batch_size=8)
        cfg.model.vocab_size = 200
        task = MLMTask(cfg, data_dir, DEVICE)
        model = pretraining_model(cfg.model, objective).train()
        micro = task.batch(0).micro[0]
        cases.append((f"{objective}-packed", model, task.loss_sum, micro))
        cases.append(
            (
                f"{objective}-padded",
                model,
                task.loss_sum,
                _padded(micro, [32, 20, 11, 32, 7, 30, 32, 25]),
            )
        )
    cfg = tiny_run_config()
    cfg.model.vocab_size = 200
    classifier = BertForSequenceClassification(cfg.model, num_labels=2).train()
    rng = random.Random(0)
    for padded in (False, True):
        cases.append(
            (
                f"classification-{'padded' if padded else 'packed'}",
                classifier,
                _classification_loss,
                _classification_batch(rng, 6, 24, padded),
            )
        )
    return cases


@pytest.mark.parametrize("path", ops.PATHS)
def test_training_forward_and_loss_have_no_graph_break(path, data_dir):
    for name, model, loss_fn, micro in _cases(data_dir):
        torch._dynamo.reset()
        with ops.use_kernels(path):
            explained = torch._dynamo.explain(loss_fn)(model, micro)
        reasons = [str(r.reason)[:300] for r in explained.break_reasons]
        assert explained.graph_break_count == 0, (name, reasons)
        assert explained.graph_count == 1, name


def _count_graphs(loss_fn, model, micros) -> CompileCounters:
    torch._dynamo.reset()
    counters = CompileCounters().start()
    compiled = compile_loss(loss_fn, backend="eager")
    for micro in micros:
        losses, _ = compiled(model, micro)
        sum(losses.values()).backward()
    return counters.read()


def test_fifty_pretraining_steps_compile_at_most_twice(data_dir):
    """The masked-token count changes every micro-batch; it is a dynamic dimension. The
    epoch's last sequence is padded, which takes a second graph (with the mask)."""
    cfg = tiny_run_config(batch_size=8, micro_batch_size=8)
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, DEVICE)
    model = pretraining_model(cfg.model, "mlm").train()
    micros = [task.batch(step).micro[0] for step in range(50)]
    assert len({m.targets.numel() for m in micros}) > 10  # the shapes do change
    padded = any(m.attention_mask is not None for m in micros)
    counted = _count_graphs(task.loss_sum, model, micros)
    assert counted.graph_breaks == 0
    assert counted.graphs == 1 + padded


def test_fifty_fine_tuning_steps_compile_at_most_twice():
    """Batches of every length and size, padded or not (two graphs: with and without
    an attention mask)."""
    cfg = tiny_run_config()
    cfg.model.vocab_size = 200
    model = BertForSequenceClassification(cfg.model, num_labels=2).train()
    rng = random.Random(1)
    micros = [
        _classification_batch(
            rng, rng.choice([3, 8]), rng.randint(4, 40), padded=rng.random() < 0.7
        )
        for _ in range(50)
    ]
    counted = _count_graphs(_classification_loss, model, micros)
    assert counted.graph_breaks == 0
    assert counted.graphs <= 2


@pytest.mark.parametrize("path,width", [("gpu", 256), ("cpu", 200)])
def test_training_logits_are_padded_where_the_kernels_want_it(path, width, data_dir):
    """The GPU kernels (and compiled steps) take the decoder on the padded vocabulary and
    the loss masks its padding columns; the CPU's eager kernels take the real rows. The
    loss is the unpadded logits' either way, and the padding rows get no gradient."""
    cfg = tiny_run_config(batch_size=8, micro_batch_size=8)
    cfg.model.vocab_size = 200  # padded to 256
    task = MLMTask(cfg, data_dir, DEVICE)
    model = pretraining_model(cfg.model, "mlm").train()
    micro = task.batch(0).micro[0]
    with ops.use_kernels(path):
        logits, _ = model(
            micro.input_ids, masked_positions=micro.masked_positions, padded_vocab=True
        )
        assert logits.shape[1] == width
        losses, _ = mlm_loss_sum(model, micro, vocab_size=200)
        losses["mlm"].backward()
    plain, _ = mlm_loss_sum(model, micro)
    torch.testing.assert_close(losses["mlm"], plain["mlm"])
    grad = model.decoder_weight.grad
    assert grad.shape[0] == 256 and torch.count_nonzero(grad[200:]) == 0


def test_long_gpu_runs_compile_by_default_and_the_flags_decide(monkeypatch):
    from bertforge.train import compiling

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(compiling, "compiler_available", lambda device: True)
    assert not compiling.should_compile(TrainConfig(max_steps=40), gpu)  # short: eager
    assert compiling.should_compile(TrainConfig(max_steps=compiling.AUTO_MIN_STEPS), gpu)
    assert compiling.should_compile(TrainConfig(time_budget=3600.0), gpu)
    assert not compiling.should_compile(TrainConfig(max_steps=10**6), cpu)  # eager is as fast
    assert not compiling.should_compile(TrainConfig(max_steps=10**6, compile=False), gpu)
    assert compiling.should_compile(TrainConfig(max_steps=10, compile=True), cpu)
    monkeypatch.setattr(compiling, "compiler_available", lambda device: False)
    assert not compiling.should_compile(TrainConfig(max_steps=10**6), gpu)  # no Triton


def test_compile_flags_reach_the_config(tmp_path):
    from bertforge.cli.main import build_parser

    parser = build_parser()
    for flags, expected in (([], None), (["--compile"], True), (["--no-compile"], False)):
        args = parser.parse_args(
            ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags]
        )
        assert vars(args).get("train.compile") == expected
