"""On a CUDA GPU: parity with transformers, bf16 training, the SDPA kernels taken, exact
resume, fine-tuning, FSDP2 in one process, and the host syncs of an optimizer step.

Every test here is marked `cuda` and skips, saying so, on a machine without a GPU
(conftest.py); `pytest -m cuda` runs just these. benchmarks/gpu_check.py runs them on
the GPU machine first.
"""

from __future__ import annotations

import json
import shutil
import socket
import warnings

import pytest
import torch
from conftest import tiny_run_config

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def _losses(run) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def test_hf_parity_in_fp32_on_cuda():
    transformers = pytest.importorskip("transformers")
    from bertforge.hf import from_hf_state_dict, model_config_from_hf
    from bertforge.model.bert import BertForPreTraining

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    theirs = transformers.BertForPreTraining(hf_cfg).eval().to(CUDA)
    config = model_config_from_hf(hf_cfg.to_dict())
    ours = BertForPreTraining(config)
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), config), strict=False)
    ours = ours.eval().to(CUDA)
    ids = torch.randint(0, 99, (3, 20), device=CUDA)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask)
        mlm, nsp = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], expected.prediction_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nsp, expected.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def test_bf16_training_falls_and_tracks_fp32(tmp_path, data_dir):
    from bertforge.commands.pretrain import run_pretrain

    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = tmp_path / precision
        run_pretrain(
            runs[precision],
            tiny_run_config(precision=precision, device="cuda", eval_every=0),
            data_dir=data_dir,
            show_progress=False,
        )
    fp32, bf16 = _losses(runs["fp32"]), _losses(runs["bf16"])
    assert sum(bf16[-5:]) / 5 < sum(bf16[:5]) / 5 - 1.0
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1


def test_sdpa_takes_flash_for_packed_batches_and_the_masked_kernel_for_padded():
    """Packed sequences pass no mask, so the flash kernel can run them; padded ones pass
    the boolean mask, which flash does not take and the memory-efficient kernel does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bertforge.config import preset
    from bertforge.model.bert import BertForPreTraining

    model = BertForPreTraining(preset("tiny", vocab_size=300)).to(CUDA).eval()
    ids = torch.randint(5, 300, (4, 64), device=CUDA)
    padding = torch.ones_like(ids)
    padding[2, 40:] = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            model(ids)  # packed: flash alone suffices
            with pytest.raises(RuntimeError):
                model(ids, attention_mask=padding)  # flash cannot take the mask
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            model(ids, attention_mask=padding)


def test_resume_on_cuda_repeats_the_losses(tmp_path, data_dir):
    """Dropout's CUDA generator state is checkpointed; the embedding backward sums with
    atomics on CUDA, so the losses agree to 1e-4, not bit for bit."""
    from bertforge.commands.pretrain import run_pretrain

    cfg = tiny_run_config(max_steps=8, checkpoint_every=4, eval_every=0, device="cuda")
    cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.1
    full, half = tmp_path / "full", tmp_path / "half"
    run_pretrain(full, cfg, data_dir=data_dir, show_progress=False)
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints" / "step-000008")
    run_pretrain(half, cfg, data_dir=data_dir, resume=True, show_progress=False)
    a, b = _losses(full), _losses(half)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_a_few_fine_tuning_steps_on_cuda(tmp_path, data_dir):
    from conftest import tiny_finetune, write_sst2

    from bertforge.commands.finetune import run_finetune
    from bertforge.commands.glue import load_glue_task
    from bertforge.commands.pretrain import run_pretrain

    run = tmp_path / "run"
    run_pretrain(
        run,
        tiny_run_config(max_steps=3, eval_every=0, device="cuda"),
        data_dir=data_dir,
        show_progress=False,
    )
    data = load_glue_task("sst2", write_sst2(tmp_path / "SST-2"))
    cfg = tiny_finetune(epochs=1)
    cfg.train.device = "cuda"
    summary = run_finetune(run, data, tmp_path / "ft", cfg, show_progress=False)
    assert summary["steps"] == 16 and 0.0 <= summary["score"] <= 1.0


def test_fsdp2_in_one_process(tmp_path, data_dir):
    """FSDP2's wrapping, sharded clipping and full-state checkpoints on one GPU give one
    plain process's losses."""
    import torch.distributed as dist

    from bertforge.tasks.mlm import MLMTask, pretraining_model
    from bertforge.train.distributed import Distributed
    from bertforge.train.loop import fit

    cfg = tiny_run_config(max_steps=5, checkpoint_every=5, eval_every=0, device="cuda")
    cfg.model.vocab_size = 200
    losses = {}
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for strategy in ("none", "fsdp"):
            torch.manual_seed(0)
            model = pretraining_model(cfg.model, "mlm").to(CUDA)
            run = tmp_path / strategy
            fit(
                model,
                MLMTask(cfg, data_dir, CUDA),
                cfg.train,
                run,
                CUDA,
                None,
                show_progress=False,
                dist=Distributed(strategy=strategy),
            )
            losses[strategy] = _losses(run)
    finally:
        dist.destroy_process_group()
    assert max(abs(a - b) for a, b in zip(losses["none"], losses["fsdp"])) < 1e-4


@pytest.mark.parametrize("defer", [False, True])
def test_host_syncs_per_optimizer_step(data_dir, defer):
    """torch.cuda.set_sync_debug_mode warns at every synchronising call: after warm-up, a
    step of three micro-batches makes exactly one, before its update; with `defer` (the
    training loop's GPU path) none, and one read brings several steps' figures."""
    from bertforge.tasks.mlm import MLMTask, pretraining_model
    from bertforge.train.optim import build_optimizer
    from bertforge.train.step import read_steps, train_step

    cfg = tiny_run_config("mlm+nsp", batch_size=12, micro_batch_size=4, device="cuda")
    cfg.model.vocab_size = 200
    task = MLMTask(cfg, data_dir, CUDA)
    model = pretraining_model(cfg.model, "mlm+nsp").to(CUDA)
    optimizer = build_optimizer(model, cfg.train)
    batches = [task.batch(step).pin_memory() for step in range(6)]

    def step(i):
        return train_step(
            model,
            optimizer,
            task.loss_sum,
            batches[i],
            lr=1e-3,
            cfg=cfg.train,
            device=CUDA,
            dtype=torch.bfloat16,
            step=i,
            defer=defer,
        )

    for i in range(2):  # cuBLAS handles, allocator pools: first-call work
        step(i)
    torch.cuda.synchronize()
    counts, pending = [], []

    def syncs(work) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pending.append(work())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for i in range(2, 6):
        counts.append(syncs(lambda i=i: step(i)))
    if defer:
        assert counts == [0, 0, 0, 0], counts
        assert syncs(lambda: read_steps(pending[:4])) == 1
        assert all(r.applied for r in pending[-1])
    else:
        assert counts == [1, 1, 1, 1], counts
