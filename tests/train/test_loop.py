"""The training loop's contract: host syncs, prefetch workers, the NaN guard, the state,
and what stays off CUDA on a CPU run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from torch.overrides import TorchFunctionMode

from bertforge.commands.pretrain import run_pretrain
from bertforge.config import TrainConfig
from bertforge.errors import BertforgeError
from bertforge.model import ops
from bertforge.tasks.mlm import MLMTask, pretraining_model
from bertforge.train import checkpoint as ckpt
from bertforge.train.loop import fit
from bertforge.train.optim import build_optimizer
from bertforge.train.step import StepBatch, read_steps, skips_on_device, train_step

# Tensor methods that copy a value to the host: on a GPU, each is a synchronisation.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class _CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


@pytest.mark.parametrize("objective", ["mlm", "mlm+nsp"])
def test_train_step_reads_the_device_once_per_step(objective, data_dir):
    """The GPU kernels on CPU tensors: one host read a step (the step's sums, metrics
    and gradient norm together), none per micro-batch."""
    cfg = tiny_run_config(objective, batch_size=12, micro_batch_size=4)  # 3 micro-batches
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    torch.manual_seed(0)
    model = pretraining_model(cfg.model, objective)
    optimizer = build_optimizer(model, cfg.train)
    batches = [task.batch(step) for step in range(3)]
    assert len(batches[0].micro) == 3
    with ops.use_kernels("gpu"):
        for step, batch in enumerate(batches):
            with _CountHostReads() as counter:
                result = train_step(
                    model,
                    optimizer,
                    task.loss_sum,
                    batch,
                    lr=1e-3,
                    cfg=cfg.train,
                    device=torch.device("cpu"),
                    dtype=None,
                    step=step,
                    clock=lambda: 0.0,
                )
            assert counter.reads == ["tolist"], counter.reads
            assert result.applied and result.counts == batch.counts


def test_a_deferred_step_reads_nothing_before_its_update(data_dir):
    """The GPU path (`defer=True`): no host read in a step, one for several steps' figures,
    and the same losses, norms and weights as the step that reads before its update."""
    cfg = tiny_run_config(batch_size=12, micro_batch_size=4)
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    runs = {}
    for defer in (False, True):
        torch.manual_seed(0)
        model = pretraining_model(cfg.model, "mlm")
        optimizer = build_optimizer(model, cfg.train)
        assert skips_on_device(optimizer)  # fused AdamW
        out, reads = [], []
        with ops.use_kernels("gpu"):
            for step in range(3):
                with _CountHostReads() as counter:
                    out.append(
                        train_step(
                            model,
                            optimizer,
                            task.loss_sum,
                            task.batch(step),
                            lr=1e-3,
                            cfg=cfg.train,
                            device=torch.device("cpu"),
                            dtype=None,
                            step=step,
                            clock=lambda: 0.0,
                            defer=defer,
                        )
                    )
                reads += counter.reads
            if defer:
                assert reads == []
                with _CountHostReads() as counter:
                    out = read_steps(out)
                assert counter.reads == ["tolist"]
        runs[defer] = out, model
    (eager, eager_model), (deferred, deferred_model) = runs[False], runs[True]
    assert [(r.terms, r.metrics, r.grad_norm, r.applied, r.counts, r.tokens) for r in eager] == [
        (r.terms, r.metrics, r.grad_norm, r.applied, r.counts, r.tokens) for r in deferred
    ]
    for a, b in zip(eager_model.parameters(), deferred_model.parameters()):
        assert torch.equal(a, b)


def test_a_deferred_non_finite_update_is_dropped_on_the_device(data_dir):
    cfg = tiny_run_config(batch_size=8, micro_batch_size=4)
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    torch.manual_seed(0)
    model = pretraining_model(cfg.model, "mlm")
    optimizer = build_optimizer(model, cfg.train)

    def step(at: int, loss_fn) -> object:
        return train_step(
            model,
            optimizer,
            loss_fn,
            task.batch(at),
            lr=1e-3,
            cfg=cfg.train,
            device=torch.device("cpu"),
            dtype=None,
            step=at,
            defer=True,
        )

    def nan_loss(m, micro):
        losses, extra = task.loss_sum(m, micro)
        return {k: v * float("nan") for k, v in losses.items()}, extra

    first = step(0, task.loss_sum)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state.items()}
    bad = step(1, nan_loss)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for k, s in optimizer.state.items():  # Adam's moments and step count untouched
        assert all(torch.equal(moments[k][n], t) for n, t in s.items())
    good = step(2, task.loss_sum)
    results = read_steps([first, bad, good])
    assert [r.applied for r in results] == [True, False, True]
    assert results[1].problem == "loss (nan)" and results[1].lr == 1e-3
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_deferred_reads_log_the_same_run(tmp_path, data_dir, monkeypatch):
    """A run that reads only to log, checkpoint and end writes the metrics and the
    checkpoints of one that reads every step."""
    import bertforge.train.loop as train

    reads = []
    real = train.read_steps
    monkeypatch.setattr(
        train, "read_steps", lambda pending: reads.append(len(pending)) or real(pending)
    )
    runs = {}
    for defer in (False, True):
        monkeypatch.setattr(train, "defer_host_reads", lambda device, defer=defer: defer)
        reads.clear()
        cfg = tiny_run_config(
            max_steps=7,
            micro_batch_size=8,
            log_every=3,
            checkpoint_every=5,
            eval_every=0,
            keep_last=5,
        )
        runs[defer] = tmp_path / f"defer-{defer}"
        run_pretrain(runs[defer], cfg, data_dir=data_dir, show_progress=False)
        if defer:  # steps 1 (first), 3 and 6 (log), 5 (checkpoint), 7 (last)
            assert [n for n in reads if n] == [1, 2, 2, 1, 1]

    def lines(run: Path) -> list[dict]:
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k not in ("elapsed_s", "tokens_per_s")} for x in out]

    assert lines(runs[False]) == lines(runs[True])
    assert [x["step"] for x in lines(runs[True]) if x["kind"] == "train"] == [1, 3, 6]
    for name in ("step-000005", "step-000007"):
        a, b = (ckpt.load_weights(runs[d] / "checkpoints" / name) for d in (False, True))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_workers_change_no_result(tmp_path, data_dir):
    """Batches are built in two background processes: the same losses, dropout included."""
    runs = {}
    for workers in (0, 2):
        cfg = tiny_run_config(max_steps=6, micro_batch_size=8, eval_every=0, num_workers=workers)
        cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.1
        runs[workers] = tmp_path / f"workers-{workers}"
        run_pretrain(runs[workers], cfg, data_dir=data_dir, show_progress=False)
    assert _losses(runs[0]) == _losses(runs[2]) and len(_losses(runs[0])) == 6


def test_shards_pickle_as_paths(data_dir):
    """Pickled into a worker, the shards travel as paths and are reopened there."""
    import pickle

    import numpy as np

    from bertforge.data.loader import ShardedSequences

    sequences = ShardedSequences(data_dir, "train")
    blob = pickle.dumps(sequences)
    shard_bytes = sum(s.nbytes for s in sequences.shards)
    assert len(blob) < min(shard_bytes, 64 << 10)
    again = pickle.loads(blob)
    index = np.arange(len(sequences))[::-7]
    assert np.array_equal(again.take(index), sequences.take(index))
    assert all(isinstance(s, np.memmap) for s in again.shards)


def test_prefetch_workers_started_by_spawn(data_dir):
    """Python 3.14 starts workers by forkserver: the task is pickled into them, as with
    spawn here, and the batches are those built in this process."""
    from bertforge.train.step import prefetch

    cfg = tiny_run_config(max_steps=2, micro_batch_size=8, num_workers=1)
    task = MLMTask(cfg, data_dir, torch.device("cpu"))
    with prefetch(task, 0, cfg.train, torch.device("cpu"), start_method="spawn") as batches:
        built = list(batches)
    assert len(built) == 2
    for step, batch in enumerate(built):
        here = task.batch(step)
        assert batch.counts == here.counts and batch.tokens == here.tokens
        for a, b in zip(batch.micro, here.micro):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


def test_a_cpu_run_never_touches_cuda(tmp_path, data_dir, monkeypatch):
    """Even where CUDA is available, a CPU run creates no CUDA context: nothing queries
    or seeds a GPU (checkpoints hold no CUDA RNG state)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in (
        "init",
        "_lazy_init",
        "get_rng_state",
        "set_rng_state",
        "manual_seed",
        "is_bf16_supported",
        "get_device_name",
        "synchronize",
        "current_device",
    ):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    cfg = tiny_run_config(max_steps=4, checkpoint_every=2, device="cpu", eval_every=0)
    run = tmp_path / "run"
    run_pretrain(run, cfg, data_dir=data_dir, show_progress=False)
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())
    assert set(state["rng"]) == {"torch"}
    cfg.train.max_steps = 4
    run_pretrain(run, cfg, data_dir=data_dir, resume=True, show_progress=False)


def test_train_state_and_the_rng_round_trip():
    state = ckpt.TrainState(step=7, tokens=1234, elapsed_s=5.5, skipped_steps=1)
    torch.manual_seed(11)
    saved = json.loads(
        json.dumps({**state.state_dict(), "rng": ckpt.rng_state(torch.device("cpu"))})
    )
    expected = torch.rand(3)
    torch.manual_seed(99)
    again = ckpt.TrainState()
    again.load_state_dict(saved)
    ckpt.set_rng_state(saved["rng"], torch.device("cpu"))
    assert again == state and torch.equal(torch.rand(3), expected)


def test_bench_times_the_training_step(monkeypatch):
    """`bertforge bench` runs train_step itself, not a copy of it."""
    from bertforge.commands import bench
    from bertforge.config import preset
    from bertforge.train import step

    calls = []
    real = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = preset("tiny", vocab_size=300)
    batch = bench.synthetic_batch(cfg, 2, 16)
    bench.bench_bertforge(cfg, [batch], torch.device("cpu"), None, steps=2, warmup=1)
    assert len(calls) == 3


# ------------------------------------------------------------------ the non-finite guard


@dataclass
class _Micro:
    def to(self, device: torch.device) -> _Micro:
        return self

    def pin_memory(self) -> _Micro:
        return self


class _InfiniteGradient(torch.nn.Module):
    """A finite loss (0) whose gradient is infinite: d/dw sqrt(w - w0) at w = w0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))


class _InfiniteGradientTask:
    def batch(self, step: int) -> StepBatch:
        return StepBatch([_Micro()], {"x": 1}, 1)

    def loss_sum(self, model, micro):
        return {"x": torch.sqrt(model.w - model.w.detach()).sum()}, {}

    def evaluate(self, model, step):
        return {}

    def epoch_at(self, step):
        return 0.0


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_gradient_never_reaches_the_weights(tmp_path, grad_clip):
    """--grad-clip 0 turns clipping off, not the guard."""
    model = _InfiniteGradient()
    cfg = TrainConfig(max_steps=2, grad_clip=grad_clip, lr=0.1, precision="fp32")
    with pytest.raises(BertforgeError, match=r"non-finite gradient norm \(inf\) at step 1"):
        fit(
            model,
            _InfiniteGradientTask(),
            cfg,
            tmp_path / "stop",
            torch.device("cpu"),
            None,
            show_progress=False,
        )
    assert model.w.item() == 1.0
    cfg.on_nan = "skip"
    result = fit(
        model,
        _InfiniteGradientTask(),
        cfg,
        tmp_path / "skip",
        torch.device("cpu"),
        None,
        show_progress=False,
    )
    assert result["step"] == 2 and model.w.item() == 1.0
    lines = (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["skipped_steps"] for r in records] == [1, 2]


# ----------------------------------------------------- the held-out loss, logged and asked


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logged_and_evaluated_held_out_loss_agree(tmp_path, data_dir, precision):
    from bertforge.commands.evaluate import evaluate_run
    from bertforge.train.runtime import resolve_precision

    if precision == "bf16" and resolve_precision("auto", torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bf16")
    run = tmp_path / "run"
    run_pretrain(
        run,
        tiny_run_config(max_steps=6, eval_every=6, precision=precision),
        data_dir=data_dir,
        show_progress=False,
    )
    logged = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "eval"
    ][-1]
    asked = evaluate_run(run)
    assert logged["precision"] == asked["precision"] == precision
    assert asked["masked_tokens"] == logged["masked_tokens"]
    assert asked["mlm_loss"] == pytest.approx(logged["mlm_loss"], abs=1e-6)
    assert evaluate_run(run, precision="fp32")["precision"] == "fp32"


def test_bf16_weights_are_cast_once_a_step_whatever_the_micro_batches(data_dir):
    """One autocast region a step: four micro-batches cast each weight to bf16 once, as
    one does, and give the same loss within bf16 rounding (bf16 is emulated where the CPU
    lacks it: slow, but the same arithmetic)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self, weights):
            super().__init__()
            self.weights, self.casts = weights, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func is torch.ops.aten._to_copy.default
                and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() in self.weights
            ):
                self.casts += 1
            return func(*args, **kwargs)

    cfg = tiny_run_config(batch_size=8)
    cfg.model.vocab_size = 200
    results = {}
    for micro in (8, 2):
        cfg.train.micro_batch_size = micro
        task = MLMTask(cfg, data_dir, torch.device("cpu"))
        torch.manual_seed(0)
        model = pretraining_model(cfg.model, "mlm")
        optimizer = build_optimizer(model, cfg.train)
        weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}
        with CountWeightCasts(weights) as counter:
            result = train_step(
                model,
                optimizer,
                task.loss_sum,
                task.batch(0),
                lr=1e-3,
                cfg=cfg.train,
                device=torch.device("cpu"),
                dtype=torch.bfloat16,
            )
        results[micro] = (counter.casts, result.loss)
    assert results[2][0] == results[8][0] > 0
    assert results[2][1] == pytest.approx(results[8][1], rel=1e-2)


# --------------------------------------------------- figures packed and read by name


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0]))


def _two_terms(model, micro):
    """Two loss terms and two metrics, each metric over another term's count."""
    w = model.w.sum()
    return {"a": 3 * w, "b": 8 * w}, {"a_hits": torch.tensor(6.0), "per_b": torch.tensor(2.0)}


def test_each_metric_is_normalised_by_the_count_it_declares():
    model = _Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = StepBatch([_Micro()], {"a": 3, "b": 4}, 5, {"a_hits": "b", "per_b": "a"})
    result = train_step(
        model,
        optimizer,
        _two_terms,
        batch,
        lr=0.0,
        cfg=TrainConfig(),
        device=torch.device("cpu"),
        dtype=None,
    )
    assert result.terms == {"a": 2.0, "b": 4.0}  # each term by its own count
    assert result.metrics == {"a_hits": 6.0 / 4, "per_b": 2.0 / 3}
    assert result.counts == {"a": 3, "b": 4} and result.tokens == 5


def test_a_metric_without_a_declared_count_is_refused():
    model = _Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = StepBatch([_Micro()], {"a": 3, "b": 4}, 5, {"a_hits": "b"})
    with pytest.raises(ValueError, match="metric 'per_b'"):
        train_step(
            model,
            optimizer,
            _two_terms,
            batch,
            lr=0.0,
            cfg=TrainConfig(),
            device=torch.device("cpu"),
            dtype=None,
        )


def test_packed_figures_unpack_by_name():
    from bertforge.train.step import Packed

    packed = Packed.of({"x": torch.tensor(1.5), "y": torch.tensor(2)}) + Packed(
        ["z"], torch.tensor([4.0], dtype=torch.float64)
    )
    assert packed.names == ["x", "y", "z"] and float(packed["y"]) == 2.0
    assert packed.unpack(packed.values.tolist()) == {"x": 1.5, "y": 2.0, "z": 4.0}
