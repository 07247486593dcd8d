"""Masked-LM pretraining: the MLM task for the training loop, and the run orchestration.

`run_pretrain` turns a corpus (or prepared data) into a trained, evaluated and exported
model in one call, caching the tokenizer and token shards in the run directory so that
a second call, or a resume, skips them.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bertforge import rundir
from bertforge.config import RunConfig
from bertforge.data.loader import PretrainBatches, ShardedSequences
from bertforge.data.masking import MaskedBatch, Masker
from bertforge.errors import BertforgeError
from bertforge.evaluate import mlm_metrics
from bertforge.losses import cross_entropy_sum
from bertforge.runtime import configure_threads, resolve_device, resolve_precision
from bertforge.train import fit

# Train-config fields a resume may change; everything else is forced from config.yaml.
RESUMABLE_OVERRIDES = {("train", k) for k in ("max_steps", "time_budget", "eval_every",
                                              "checkpoint_every", "log_every", "keep_last",
                                              "device", "on_nan")} | {("data", "path")}


class MLMTask:
    """Masked-LM over prepared shards: sparse prediction at the masked positions only."""

    def __init__(self, cfg: RunConfig, data_dir: Path, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        train = ShardedSequences(data_dir, "train")
        manifest = train.manifest
        self.masker = Masker(vocab_size=int(manifest["vocab_size"]),
                             special_ids=manifest["special_token_ids"],
                             mask_rate=cfg.data.mask_rate,
                             mask_token_ratio=cfg.data.mask_token_ratio,
                             random_token_ratio=cfg.data.random_token_ratio)
        t = cfg.train
        self.batches = PretrainBatches(train, self.masker, t.batch_size, t.micro_batch_size,
                                       t.seed, rank, world_size)
        self.valid = ShardedSequences(data_dir, "valid")
        self.device = device
        self.eval_sequences = t.eval_sequences
        self.eval_batch_size = max(t.micro_batch_size, 32)
        self.tokens_per_step = t.batch_size * train.seq_len

    def micro_batches(self, step: int) -> list[MaskedBatch]:
        return [m.to(self.device) for m in self.batches.micro_batches(step)]

    def count(self, micro: MaskedBatch) -> int:
        return micro.targets.numel()

    def loss_sum(self, model: torch.nn.Module, micro: MaskedBatch) -> tuple[torch.Tensor, dict]:
        logits, _ = model(micro.input_ids, token_type_ids=micro.token_type_ids,
                          attention_mask=micro.attention_mask,
                          masked_positions=micro.masked_positions)  # (N, V)
        loss = cross_entropy_sum(logits, micro.targets)
        correct = (logits.detach().argmax(-1) == micro.targets).sum()
        return loss, {"mlm_accuracy": correct}

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        if len(self.valid) == 0:
            return {}
        return mlm_metrics(model, self.valid, self.masker, self.device,
                           self.eval_batch_size, self.eval_sequences)

    def epoch_at(self, step: int) -> float:
        return self.batches.epoch_at(step)


def build_data(run_dir: Path, corpus: list[str], vocab_size: int, lowercase: bool,
               cfg: RunConfig, show_progress: bool) -> Path:
    """Tokenizer and shards inside RUN_DIR, each built only if not already there."""
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.prepare import prepare
    from bertforge.tokenizer import train_tokenizer

    files = [str(p) for p in resolve_corpus(corpus)]
    tok_dir, data_dir = run_dir / rundir.TOKENIZER, run_dir / rundir.DATA
    if not (tok_dir / "tokenizer.json").is_file():
        t0 = time.monotonic()
        train_tokenizer(files, tok_dir, vocab_size=vocab_size, lowercase=lowercase,
                        show_progress=show_progress)
        print(f"tokenizer: trained in {time.monotonic() - t0:.1f}s -> {tok_dir}", file=sys.stderr)
    if not (data_dir / "manifest.json").is_file():
        t0 = time.monotonic()
        prepare(files, tok_dir, data_dir, seq_len=cfg.data.seq_len,
                valid_fraction=cfg.data.valid_fraction, show_progress=show_progress)
        print(f"prepare: done in {time.monotonic() - t0:.1f}s -> {data_dir}", file=sys.stderr)
    return data_dir


def check_data(data_dir: Path, cfg: RunConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """The data directory's manifest, refused if it does not fit the run's config; with
    `run_dir` (a resume), also if it was made with another tokenizer than the run's."""
    from bertforge.data.prepare import load_manifest
    from bertforge.tokenizer import tokenizer_hash

    manifest = load_manifest(data_dir)
    if int(manifest["seq_len"]) != cfg.data.seq_len:
        raise BertforgeError(f"data.seq_len: {data_dir} was prepared with seq_len "
                             f"{manifest['seq_len']}, but the run has seq_len {cfg.data.seq_len}")
    check_lengths(cfg)
    expected = cfg.data.tokenizer_hash
    if run_dir is not None and expected is None and (run_dir / rundir.TOKENIZER).is_dir():
        expected = tokenizer_hash(run_dir / rundir.TOKENIZER)  # a run that recorded none
    found = manifest.get("tokenizer_hash") or tokenizer_hash(Path(data_dir) / "tokenizer")
    if expected and found != expected:
        raise BertforgeError(f"data.tokenizer_hash: {data_dir} was made with tokenizer "
                             f"{found}, but the run uses tokenizer {expected}")
    if run_dir is not None and int(manifest["vocab_size"]) != cfg.model.vocab_size:
        raise BertforgeError(f"model.vocab_size: {data_dir} has a vocabulary of "
                             f"{manifest['vocab_size']}, but the run has {cfg.model.vocab_size}")
    manifest["tokenizer_hash"] = found
    return manifest


def check_lengths(cfg: RunConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise BertforgeError(f"data.seq_len {cfg.data.seq_len} exceeds "
                             f"model.max_position_embeddings {cfg.model.max_position_embeddings}")


def resolve_resume(run_dir: Path, cfg: RunConfig, given: dict[str, dict[str, Any]]) -> RunConfig:
    """The saved config, with only the schedule fields the user re-gave changed.

    Any other field given with a different value is refused, naming the field.
    """
    saved = RunConfig.load(run_dir / rundir.CONFIG)
    for section, values in given.items():
        for key, value in values.items():
            if (section, key) == ("model", "vocab_size"):  # fixed by the tokenizer already built
                continue
            old = getattr(getattr(saved, section), key)
            if (section, key) in RESUMABLE_OVERRIDES:
                setattr(getattr(saved, section), key, value)
            elif old != value:
                raise BertforgeError(f"--resume: {section}.{key} was {old!r} in this run, "
                                     f"cannot change it to {value!r}")
    return saved


def run_pretrain(run_dir: Path, cfg: RunConfig, *, data_dir: Path | None = None,
                 corpus: list[str] | None = None, resume: bool = False,
                 lowercase: bool = True, given: dict[str, dict[str, Any]] | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Pretrain into `run_dir`; returns the final metrics."""
    from bertforge.hf import export_model
    from bertforge.model import BertForPreTraining

    run_dir = Path(run_dir)
    if resume:
        rundir.require_run_dir(run_dir)
        cfg = resolve_resume(run_dir, cfg, given or {})
    elif (run_dir / rundir.CHECKPOINTS).exists():
        raise BertforgeError(f"{run_dir} already holds a run; pass --resume to continue it "
                             f"or choose another --out")
    check_lengths(cfg)  # before any work: building the data can take a while
    run_dir.mkdir(parents=True, exist_ok=True)
    if corpus:
        data_dir = build_data(run_dir, corpus, cfg.model.vocab_size, lowercase, cfg,
                              show_progress)
    elif data_dir is None:
        data_dir = Path(cfg.data.path) if cfg.data.path else run_dir / rundir.DATA
    cfg.data.path = str(Path(data_dir).resolve())
    manifest = check_data(Path(data_dir), cfg, run_dir if resume else None)
    tok_dir = run_dir / rundir.TOKENIZER
    if not tok_dir.exists():  # copied whole or not at all
        tmp = run_dir / f".{rundir.TOKENIZER}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(data_dir) / "tokenizer", tmp)
        os.replace(tmp, tok_dir)
    cfg.model.vocab_size = int(manifest["vocab_size"])
    cfg.model.pad_token_id = int(manifest["special_token_ids"]["pad"])
    cfg.data.tokenizer_hash = manifest["tokenizer_hash"]  # checked on every resume
    cfg.save(run_dir / rundir.CONFIG)

    threads = configure_threads()
    device = resolve_device(cfg.train.device)
    dtype = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    model = BertForPreTraining(cfg.model).to(device)
    task = MLMTask(cfg, Path(data_dir), device)
    print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(task.batches.sequences):,} training sequences of {cfg.data.seq_len} tokens, "
          f"batch {cfg.train.batch_size} (micro {cfg.train.micro_batch_size}), "
          f"{device.type} {'bf16' if dtype else 'fp32'}, {threads} threads", file=sys.stderr)
    result = fit(model, task, cfg.train, run_dir, device, dtype, resume=resume, name="pretrain",
                 show_progress=show_progress)
    export_model(model.cpu(), run_dir / rundir.HF, tokenizer_dir=tok_dir)
    write_run_report(run_dir)
    return result


def write_run_report(run_dir: Path) -> None:
    """Plots and report.md in RUN_DIR/report; a missing matplotlib only warns."""
    from bertforge.report import write_report

    try:
        out = write_report(run_dir)
    except BertforgeError as e:
        print(f"report: skipped ({e})", file=sys.stderr)
    else:
        print(f"report: {out}", file=sys.stderr)
